"""The subcommands of `open-clip-cxr`: the library's own, plus those other packages register.

A subcommand is a `Command`: the module that exposes `add_arguments(parser)` and `run(args)`
(imported only when the subcommand runs, so `--help` stays fast), its one-line help, and its
place in the listing (data flows top to bottom: lower `order` first).

The library names only its own modules. The training wing, conversion and the Hub publisher
add theirs through the entry-point group `open_clip_cxr.commands` (see pyproject.toml):

    [project.entry-points."open_clip_cxr.commands"]
    train-text = "some_package.commands:TRAIN_TEXT"     # a `Command` object

so a third party adds a subcommand the same way, without editing this package.
"""
import sys
from typing import Dict, NamedTuple

ENTRY_POINT_GROUP = "open_clip_cxr.commands"


class Command(NamedTuple):
    """One subcommand: `module` has `add_arguments(parser)` and `run(args)`."""
    module: str
    help: str
    order: int = 100


# The library's own steps.
OWN: Dict[str, Command] = {
    "shards": Command("open_clip_cxr.data.cli",
                      "write WebDataset shards from MIMIC-CXR, CheXpert Plus, Open-I or a CSV/JSONL", 10),
    "eval": Command("open_clip_cxr.eval.cli",
                    "retrieval recall@K, zero-shot findings, report metrics, text robustness", 40),
    "index": Command("open_clip_cxr.search.cli_index", "encode an archive into a searchable index (FAISS + SQLite)", 80),
    "search": Command("open_clip_cxr.search.cli_search", "search an index by report text or by image", 90),
    "serve": Command("open_clip_cxr.search.serve", "a local web page to search an index", 100),
}


def registered() -> Dict[str, Command]:
    """The entry points of `ENTRY_POINT_GROUP`: name -> `Command`. One that fails to load, is not
    a `Command`, or reuses a library command's name is left out with a warning on stderr."""
    found: Dict[str, Command] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cmd = ep.load()
        except Exception as exc:  # noqa: BLE001  (a broken plugin must not break the other commands)
            print(f"open-clip-cxr: warning: command {ep.name!r} ({ep.value}) did not load: {exc}", file=sys.stderr)
            continue
        if isinstance(cmd, tuple) and not isinstance(cmd, Command) and len(cmd) in (2, 3):
            cmd = Command(*cmd)
        if not isinstance(cmd, Command) or ep.name in OWN:
            why = "is not a Command" if not isinstance(cmd, Command) else "reuses a built-in command's name"
            print(f"open-clip-cxr: warning: command {ep.name!r} ({ep.value}) {why}; left out", file=sys.stderr)
            continue
        found[ep.name] = cmd
    return found


def entry_points(group: str):
    """`importlib.metadata.entry_points(group=...)`, imported only when a command table is needed."""
    from importlib.metadata import entry_points as _entry_points
    return _entry_points(group=group)


def all_commands() -> Dict[str, Command]:
    """The library's commands and the registered ones, in listing order."""
    merged = {**OWN, **registered()}
    return dict(sorted(merged.items(), key=lambda kv: (kv[1].order, kv[0])))
