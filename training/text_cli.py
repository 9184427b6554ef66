"""`open-clip-cxr train-text`: its flags, free of torch so that `--help` answers at once.

The work is `training.text_stage.run`, imported only when the command runs.
"""
import argparse
import os

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "text-cxr-llm-small-cpu.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="YAML recipe (default: the CPU recipe)")
    parser.add_argument("--out", default=None, help="output folder (the exported OpenCLIP model); overrides output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set supcon.steps=20 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from training import text_stage
    return text_stage.run(args)
