"""Report sources, registered by name: the one place every reader of reports goes through.

A source is a reader function decorated with `@register_source(name)`. It takes keyword
options (`root`, `reports`, `table`, `views`, ... as its docstring says) and yields, one study
at a time, `Report`s (their `images` hold resolved `path`s, plus `id` / `view` when known;
their `split` is the dataset's official one, or None) and `Skipped` records for inputs it
cannot use. Everything else is derived here, the same way for every source:

- `iter_source(name, ...)`: one `Sample` per image (+ the `Skipped`s) for `open-clip-cxr shards`;
- `iter_reports(spec, split)`: the `Report`s of one split, for stage 1, the text-robustness
  eval and the demo (no images needed);

and both assign splits with the one rule of `open_clip_cxr.reports.splits`. Adding a dataset
is one reader + its decorator: shards, stage 1 and eval all see it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

from open_clip_cxr.data.records import EMPTY_REPORT, NO_IMAGE, Record, Sample, Skipped, make_key, report_problem
from open_clip_cxr.reports.splits import DEFAULT_TEST, DEFAULT_VAL, report_split

# the modules holding the built-in readers (imported on first use, so `--help` stays fast)
_BUILTIN = ("open_clip_cxr.data.sources", "open_clip_cxr.data.table_source", "open_clip_cxr.data.shard_reports")


@dataclass(frozen=True)
class Source:
    """A registered reader. `path_arg`: which option a recipe's generic `path:` means;
    `images`: whether its reports name image files (so that it can be written to shards)."""
    name: str
    read: Callable[..., Iterator]
    path_arg: Optional[str] = None
    images: bool = True

    @property
    def help(self) -> str:
        return (self.read.__doc__ or "").strip().split("\n\n")[0]


_SOURCES: Dict[str, Source] = {}


def register_source(name: str, *, path_arg: Optional[str] = None, images: bool = True):
    """Decorator: register `fn` as the reader of source `name` (a later registration replaces it)."""
    def deco(fn):
        _SOURCES[name] = Source(name, fn, path_arg, images)
        return fn
    return deco


def sources() -> Dict[str, Source]:
    """Every registered source, the built-in ones first."""
    for module in _BUILTIN:
        importlib.import_module(module)
    return dict(_SOURCES)


def get_source(name: str) -> Source:
    found = sources()
    if name not in found:
        raise ValueError(f"unknown source {name!r}; choose from {', '.join(found)}")
    return found[name]


# ---------------------------------------------------------------- images: shards

def expand_samples(records, views=None, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST) -> Iterator[Record]:
    """A reader's records -> one `Sample` per image of each report (`Skipped`s pass through)."""
    wanted = {v.upper() for v in views} if views else None
    for rec in records:
        if isinstance(rec, Skipped):
            yield rec
            continue
        yield from _report_samples(rec, wanted, val, test)


def _report_samples(report, wanted, val, test) -> Iterator[Record]:
    study_key = make_key(report.source, report.study_id)
    if report_problem(report):
        yield Skipped(study_key, EMPTY_REPORT, f"study {report.study_id}")
        return
    if not report.images:
        yield Skipped(study_key, NO_IMAGE, f"study {report.study_id} lists no image")
        return
    split = report_split(report, val, test)
    for img in report.images:
        view = img.get("view")
        if img.get("ap_pa") and (view or "").lower() != "lateral":
            view = img["ap_pa"]  # CheXpert Plus: "Frontal" + "PA" -> "PA", like MIMIC's ViewPosition
        if wanted is not None and (view or "").upper() not in wanted:
            continue
        image_id = img.get("id") or Path(img["path"]).stem
        yield Sample(report.source, str(report.study_id), str(image_id), str(img["path"]), report, split,
                     patient_id=report.patient_id, view=view, labels=dict(report.labels))


def iter_source(name: str, *, root=None, reports=None, table=None, views=None, val=DEFAULT_VAL, test=DEFAULT_TEST,
                **options) -> Iterator[Record]:
    """`Sample`s and `Skipped`s of source `name` (the `--source` of `open-clip-cxr shards`)."""
    source = get_source(name)
    if not source.images:
        raise ValueError(f"source {name!r} holds no images, so it cannot be written to shards")
    for label, path in (("--root", root), ("--reports", reports), ("--table", table)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{label} {path} does not exist")
    records = source.read(root=root, reports=reports, table=table, views=views, for_images=True, **options)
    return expand_samples(records, views=views, val=val, test=test)


# ---------------------------------------------------------------- text: stage 1, eval, demo

SPEC_KEYS_NOT_FOR_READERS = ("source", "split", "limit", "path")


def iter_reports(spec: dict, split: Optional[str] = None, *, val=DEFAULT_VAL, test=DEFAULT_TEST,
                 on_skip: Optional[Callable[[Skipped], None]] = None) -> Iterator:
    """The `Report`s of `split` (None: every split) from `spec`, a dict such as a recipe's `data:`:
    `source: NAME` (default `shards` when `shards:` is given) and the reader's options, where a
    generic `path:` is the source's main input. Each report's `split` is set by the split rule."""
    name = spec.get("source") or ("shards" if spec.get("shards") else None)
    if not name:
        raise ValueError(f"give `source:` (one of {', '.join(sources())}) or `shards:`, got {spec}")
    source = get_source(name)
    options = {k: v for k, v in spec.items() if k not in SPEC_KEYS_NOT_FOR_READERS and v is not None}
    if spec.get("path") is not None and source.path_arg:
        options[source.path_arg] = spec["path"]
    for rec in source.read(**options):
        if isinstance(rec, Skipped):
            if on_skip is not None:
                on_skip(rec)
            continue
        rec.split = report_split(rec, val, test)
        if split is None or rec.split == split:
            yield rec
