"""`open-clip-cxr train-clip`: its flags, free of torch so that `--help` answers at once.

The work is `open_clip_cxr_train.clip_stage.run`, imported only when the command runs.
"""
import argparse

from open_clip_cxr_train.text_cli import HelpRecipe, add_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None, help="YAML recipe (see training/recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set optim.grad_clip=0.5 (repeatable)")
    add_output_dir(parser, "output_dir")
    parser.add_argument("--max-steps", type=int, default=None, help="shorthand for --set train.max_steps=N")
    parser.add_argument("--help-recipe", action=HelpRecipe, stage="clip",
                        help="list every recipe key (type, default, meaning) and exit")


def run(args: argparse.Namespace) -> int:
    from open_clip_cxr_train import clip_stage
    return clip_stage.run(args)
