"""`open-clip-cxr train-text`: its flags, free of torch so that `--help` answers at once.

The work is `open_clip_cxr_train.text_stage.run`, imported only when the command runs.
"""
import argparse
import os

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "text-cxr-llm-small-cpu.yaml")


class HelpRecipe(argparse.Action):
    """`--help-recipe`: every recipe key of the stage (dotted key, type, default, meaning), then exit."""

    def __init__(self, option_strings, dest, stage: str = "text", **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kw)
        self.stage = stage

    def __call__(self, parser, namespace, values, option_string=None):
        from open_clip_cxr_train.recipe_check import help_text
        print(help_text(self.stage))
        parser.exit()


def add_output_dir(parser: argparse.ArgumentParser, dest: str) -> None:
    """`--output-dir` (both stages' name for it), `--out` kept as a hidden alias."""
    parser.add_argument("--output-dir", dest=dest, default=None, metavar="DIR",
                        help="run folder (checkpoints, logs, the exported OpenCLIP model); overrides output_dir")
    parser.add_argument("--out", dest=dest, default=None, help=argparse.SUPPRESS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="YAML recipe (default: the CPU recipe)")
    add_output_dir(parser, "out")      # text_stage.run reads args.out
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set supcon.steps=20 (repeatable)")
    parser.add_argument("--help-recipe", action=HelpRecipe, stage="text",
                        help="list every recipe key (type, default, meaning) and exit")


def run(args: argparse.Namespace) -> int:
    from open_clip_cxr_train import text_stage
    return text_stage.run(args)
