"""`open-clip-cxr`: one command, one subcommand per pipeline step.

Each step lives in its own module exposing `add_arguments(parser)` and `run(args)`;
modules are imported only when their subcommand runs, so `--help` stays fast.
"""
import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Data flows top to bottom.
COMMANDS = {
    "shards": ("open_clip_cxr.data.cli", "write WebDataset shards from MIMIC-CXR, CheXpert Plus, Open-I or a CSV/JSONL"),
    "train-text": ("training.text_stage", "stage 1: adapt the text tower (MNTP, then supervised contrastive)"),
    "train-clip": ("training.clip_stage", "stage 2: contrastive image-report training (LoRA text tower)"),
    "eval": ("open_clip_cxr.eval.cli", "retrieval recall@K, zero-shot findings, report metrics, text robustness"),
    "convert": ("conversion.cli", "import the authors' releases; merge LoRA"),
    "export": ("conversion.export", "write an OpenCLIP Hub folder (config, safetensors, tokenizer, card)"),
    "push": ("hub_cards.push", "upload an exported folder to the Hugging Face Hub"),
    "index": ("open_clip_cxr.search.cli_index", "encode an archive into a searchable index (FAISS + SQLite)"),
    "search": ("open_clip_cxr.search.cli_search", "search an index by report text or by image"),
    "serve": ("open_clip_cxr.search.serve", "a local web page to search an index"),
    "demo": ("training.demo", "the whole pipeline on real offline assets, on the CPU"),
}


def build_parser(load=None):
    parser = argparse.ArgumentParser(prog="open-clip-cxr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load in (name, "all"):
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    args = build_parser(load=command).parse_args(argv)
    return importlib.import_module(COMMANDS[command][0]).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
