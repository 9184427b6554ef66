"""`open-clip-cxr`: one command, one subcommand per pipeline step.

Each step lives in its own module exposing `add_arguments(parser)` and `run(args)`;
modules are imported only when their subcommand runs, so `--help` stays fast. The library's
own steps are listed in `open_clip_cxr.commands`; the training wing, conversion and the Hub
publisher register theirs through the `open_clip_cxr.commands` entry-point group.

Errors: a user's mistake (a missing file or folder, an unknown model name, a bad flag value,
empty data, an offline hub, a refused checkpoint) prints one line on stderr naming the problem
and the fix, and exits 2; anything else is a bug and keeps its traceback.
"""
import argparse
import importlib
import sys
from collections.abc import Mapping



class _Commands(Mapping):
    """subcommand -> `Command(module, help, order)`: the library's own steps and those registered
    through the `open_clip_cxr.commands` entry points (see `open_clip_cxr.commands`), read once."""

    def __init__(self):
        self._table = None

    def _load(self):
        if self._table is None:
            from open_clip_cxr.commands import all_commands
            self._table = all_commands()
        return self._table

    def __getitem__(self, name):
        return self._load()[name]

    def __iter__(self):
        return iter(self._load())

    def __len__(self):
        return len(self._load())


COMMANDS = _Commands()


def build_parser(load=None, table=None):
    """The parser; `load`: the subcommand (or "all") whose arguments are added; `table`: the commands
    to offer (default: every one, registered ones included)."""
    parser = argparse.ArgumentParser(prog="open-clip-cxr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in (COMMANDS if table is None else table).items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if load in (name, "all"):
            importlib.import_module(cmd.module).add_arguments(p)
    return parser


def user_error(exc: BaseException) -> bool:
    """Is `exc` the user's mistake (one line, exit 2) rather than a bug (traceback)?"""
    from open_clip_cxr.errors import UsageError
    if _hub_cause(exc) is not None:
        return True
    if isinstance(exc, (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                        PermissionError)):
        return True
    # Errors our modules raise for bad inputs, and the hub's "offline / not found" family.
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & ({"ShardWriterError", "ShardCheckError", "ReportTextError", "UnsafeCheckpointError",
                          "CheckpointMismatchError", "ExportMismatchError", "HFValidationError", "RecipeError"}
                         | _HUB_ERRORS)) or (type(exc) is OSError and "huggingface" in str(exc).lower()) or (
        isinstance(exc, ValueError) and "trust_remote_code" in str(exc))


_HUB_ERRORS = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError"}


def _hub_cause(exc: BaseException):
    """The Hub's "not found / offline" error behind `exc` (OpenCLIP wraps it in a RuntimeError), or None."""
    seen = 0
    while exc is not None and seen < 10:
        if {c.__name__ for c in type(exc).__mro__} & _HUB_ERRORS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def one_line(exc: BaseException) -> str:
    """The error as one line, with the fix where the message itself lacks one."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    if "trust_remote_code" in text:
        return (f"{text[:200]}... : the folder asks to run its own code (auto_map); open_clip_cxr never runs code "
                "from a model folder: use a folder whose config names a transformers or cxr-text: architecture")
    hub = _hub_cause(exc)
    if hub is not None:
        return (f"{text[:300]} ({type(hub).__name__}): check the ORG/NAME; offline (HF_HUB_OFFLINE=1) only models "
                "already in the Hugging Face cache load: download it first, or use local-dir:FOLDER")
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    from open_clip_cxr.commands import OWN
    if command not in OWN and command not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    # a library command needs no scan of the installed entry points (`--help` stays fast)
    args = build_parser(load=command, table=OWN if command in OWN else None).parse_args(argv)
    import open_clip_cxr
    try:
        open_clip_cxr.ensure_registered()
        return importlib.import_module((OWN.get(command) or COMMANDS[command]).module).run(args) or 0
    except SystemExit as exc:
        if isinstance(exc.code, str):  # `raise SystemExit("message")`: a user error, said in one line
            print(f"open-clip-cxr {command}: error: {' '.join(exc.code.split())}", file=sys.stderr)
            return 2
        raise
    except Exception as exc:  # noqa: BLE001  (sorted into user errors and bugs)
        if not user_error(exc):
            raise
        print(f"open-clip-cxr {command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
