"""What every report reader shares: the `ReportError` they raise, the `on_error` routing of
bad reports, UTF-8 decoding, the `Report` builder, and row iteration over CSV/TSV/JSONL files."""
import csv
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Union

from .clean import join_sections
from .types import Report

PathLike = Union[str, os.PathLike]
OnError = Union[None, str, Callable[["ReportError"], None]]
log = logging.getLogger("open_clip_cxr.reports.parsers")


class ReportError(ValueError):
    """A report that cannot be used (empty, unreadable, not UTF-8); the message names where it came from."""


class _Errors:
    """Routes bad-report errors of one iteration to `on_error`; counts the skipped ones."""

    def __init__(self, on_error: OnError, where):
        if not (on_error is None or on_error == "raise" or callable(on_error)):
            raise ValueError(f"on_error must be None, 'raise' or a callable, not {on_error!r}")
        self.on_error, self.where, self.skipped = on_error, where, 0

    def __call__(self, err: "ReportError") -> None:
        if self.on_error == "raise":
            raise err
        self.skipped += 1
        if self.on_error is None:
            log.debug("skipping: %s", err)
        else:
            self.on_error(err)

    def done(self) -> None:
        if self.on_error is None and self.skipped:
            log.warning("%s: skipped %d unusable report(s) (pass on_error to see them)", self.where, self.skipped)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReportError(f"{where}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def _read_bytes(path: PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ReportError(f"{path}: report file not found") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a directory, not a report file") from None


def _make_report(fields: Dict[str, str], where: str, **kw) -> Report:
    findings, impression = fields.get("findings", ""), fields.get("impression", "")
    if not findings and not impression:
        raise ReportError(f"{where}: empty report (no findings or impression text)")
    extra = dict(kw.pop("extra", {}))
    for k in ("indication", "comparison", "technique", "history", "examination"):
        if fields.get(k):
            extra.setdefault(k, fields[k])
    return Report(findings=findings, impression=impression, text=join_sections(findings, impression),
                  extra=extra, **kw)


# ------------------------------------------------------------------ rows of tables

_EMPTY = {"", "nan", "none", "null", "n/a"}


def _value(row: Dict, *cols) -> str:
    for c in cols:
        if c is None:
            continue
        v = row.get(c)
        if v is None or isinstance(v, (list, dict)):
            continue
        v = str(v).strip()
        if v.lower() not in _EMPTY:
            return v
    return ""


def _has_bad_bytes(row: Dict) -> bool:
    # Rows are decoded with surrogateescape: an undecodable byte shows up as a lone surrogate.
    return any(isinstance(v, str) and re.search("[\udc80-\udcff]", v) for v in row.values())


def _open_text(path: Path):
    try:
        return open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="")
    except FileNotFoundError:
        raise ReportError(f"{path}: file not found") from None


def _iter_rows(path: PathLike):
    """(where, row) for each row of a CSV/TSV or JSONL file; bad rows come as (where, ReportError)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ReportError(f"{path}: file not found") from None
        with f:
            for n, raw in enumerate(f, 1):
                where = f"{path}:{n}"
                if not raw.strip():
                    continue
                try:
                    row = json.loads(_decode(raw, where))
                    if not isinstance(row, dict):
                        raise ReportError(f"{where}: JSON line is not an object")
                except ReportError as e:
                    yield where, e
                    continue
                except json.JSONDecodeError as e:
                    yield where, ReportError(f"{where}: invalid JSON ({e.msg})")
                    continue
                yield where, row
        return
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))   # full reports can exceed the 128 kB default
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if _has_bad_bytes(row):
                yield where, ReportError(f"{where}: not valid UTF-8")
            else:
                yield where, row
