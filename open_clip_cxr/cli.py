"""`open-clip-cxr`: one command, one subcommand per pipeline step.

Each step lives in its own module exposing `add_arguments(parser)` and `run(args)`;
modules are imported only when their subcommand runs, so `--help` stays fast.

Errors: a user's mistake (a missing file or folder, an unknown model name, a bad flag value,
empty data, an offline hub, a refused checkpoint) prints one line on stderr naming the problem
and the fix, and exits 2; anything else is a bug and keeps its traceback.
"""
import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Data flows top to bottom; add a step with one entry.
COMMANDS = {
    "shards": ("open_clip_cxr.data.cli", "write WebDataset shards from MIMIC-CXR, CheXpert Plus, Open-I or a CSV/JSONL"),
    "train-text": ("training.text_stage", "stage 1: adapt the text tower (MNTP, then supervised contrastive)"),
    "train-clip": ("training.clip_stage", "stage 2: contrastive image-report training (LoRA text tower)"),
    "eval": ("open_clip_cxr.eval.cli", "retrieval recall@K, zero-shot findings, report metrics, text robustness"),
    "convert": ("conversion.cli", "import the authors' releases; merge LoRA"),
    "export": ("conversion.export", "write an OpenCLIP Hub folder (config, safetensors, tokenizer, card)"),
    "push": ("hub_cards.push", "upload an exported folder to the Hugging Face Hub"),
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


def user_error(exc: BaseException) -> bool:
    """Is `exc` the user's mistake (one line, exit 2) rather than a bug (traceback)?"""
    from open_clip_cxr.errors import UsageError
    if isinstance(exc, (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                        PermissionError)):
        return True
    # Errors our modules raise for bad inputs, and the hub's "offline / not found" family.
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ShardWriterError", "ShardCheckError", "ReportTextError", "UnsafeCheckpointError",
                         "CheckpointMismatchError", "ExportMismatchError", "OfflineModeIsEnabled",
                         "LocalEntryNotFoundError", "RepositoryNotFoundError", "HFValidationError",
                         "GatedRepoError", "RecipeError"}) or (
        type(exc) is OSError and "huggingface" in str(exc).lower() or "trust_remote_code" in str(exc))


def one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    args = build_parser(load=command).parse_args(argv)
    import open_clip_cxr
    try:
        open_clip_cxr.ensure_registered()
        return importlib.import_module(COMMANDS[command][0]).run(args) or 0
    except SystemExit as exc:
        if isinstance(exc.code, str):  # `raise SystemExit("message")`: a user error, said in one line
            print(f"open-clip-cxr {command}: error: {one_line(exc.code)}", file=sys.stderr)
            return 2
        raise
    except Exception as exc:  # noqa: BLE001  (sorted into user errors and bugs)
        if not user_error(exc):
            raise
        print(f"open-clip-cxr {command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
