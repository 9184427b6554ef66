"""The `table` source: a CSV / TSV / JSONL with an image path column and a report column (one row
per image), as hospital exports come. Columns are named by flags, else found by their
conventional names (`study_id`/`study`, `patient_id`/`patient`, `split`, any case)."""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Dict, Iterator, List

from open_clip_cxr.data.records import DUPLICATE_ROW, Record, Skipped, error_collector, make_key
from open_clip_cxr.data.registry import expand_samples, register_source
from open_clip_cxr.data.tables_io import open_text_table
from open_clip_cxr.reports.reading import _iter_rows

# Column names a table source uses without flags (matched case-insensitively, first found wins).
CONVENTIONAL_COLUMNS = {"study_col": ("study_id", "study"), "patient_col": ("patient_id", "patient", "subject_id"),
                        "split_col": ("split",)}


def table_columns(table) -> List[str]:
    """The column names of a CSV/TSV (its header) or a JSONL (the keys of its first 100 objects)."""
    path = Path(table)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        cols: Dict[str, None] = {}
        with open(path, "rb") as f:
            for raw in itertools.islice((r for r in f if r.strip()), 100):
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    cols.update(dict.fromkeys(row))
        return list(cols)
    with open_text_table(path) as f:
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        return next(csv.reader(f, dialect=dialect), [])


def resolve_table_columns(table, *, image_col="image", report_col="report", findings_col=None,
                          impression_col=None, study_col=None, patient_col=None, split_col=None) -> dict:
    """The columns to read: flags as given (any case), else the conventional names
    (`study_id`/`study`, `patient_id`/`patient`, `split`, in any case). Raises `UsageError` when the
    image or report column is missing, naming the columns the table has."""
    from open_clip_cxr.errors import UsageError
    have = table_columns(table)
    lower = {c.lower().strip(): c for c in have}

    def find(name):
        return None if name is None else (name if name in have else lower.get(name.lower().strip()))
    chosen = {"image_col": image_col, "report_col": report_col, "findings_col": findings_col,
              "impression_col": impression_col, "study_col": study_col, "patient_col": patient_col,
              "split_col": split_col}
    for key, flag in chosen.items():
        col = find(flag)
        if flag is not None and col is None and not (key == "report_col" and (findings_col or impression_col)):
            raise UsageError(f"--table {table} has no column {flag!r} (--{key[:-4]}-col); its columns are "
                             f"{', '.join(have[:20]) or 'none'}; pass --{key[:-4]}-col NAME")
        chosen[key] = col
    for key, names in CONVENTIONAL_COLUMNS.items():
        if chosen[key] is None:
            chosen[key] = next((lower[n] for n in names if n in lower), None)
    return chosen


def _duplicate_rows(table, study_col: str, image_col: str, source: str) -> Iterator[Skipped]:
    """A `Skipped` for each row that names an image its study already has (an identical repeated
    row, or the same image with other text): the parser keeps the first, and the manifest must
    still count the others."""
    seen: Dict[tuple, tuple] = {}
    for where, row in _iter_rows(table):
        if not isinstance(row, dict) or not str(row.get(image_col) or "").strip():
            continue
        study, image = str(row.get(study_col) or "").strip(), str(row.get(image_col)).strip()
        ident = json.dumps(sorted((k, str(v)) for k, v in row.items()))
        if (study, image) in seen:
            same = seen[(study, image)][1] == ident
            yield Skipped(make_key(source, study, "row", where.rsplit(":", 1)[-1]), DUPLICATE_ROW,
                          f"{where} {'repeats' if same else 'names the image of'} {seen[(study, image)][0]}")
            continue
        seen[(study, image)] = (where, ident)


def _conventional(table, columns: dict) -> dict:
    """`columns` with its unset study / patient / split columns filled by their conventional names,
    so that every reader of a table (shards, stage 1, eval) splits it the same way."""
    missing = [k for k in CONVENTIONAL_COLUMNS if columns.get(k) is None]
    if not missing:
        return columns
    lower = {c.lower().strip(): c for c in table_columns(table)}
    filled = dict(columns)
    for key in missing:
        filled[key] = next((lower[n] for n in CONVENTIONAL_COLUMNS[key] if n in lower), None)
    return filled


@register_source("table", path_arg="table")
def read_table(table=None, *, root=None, image_col="image", report_col="report", findings_col=None,
               impression_col=None, study_col=None, patient_col=None, split_col=None, source="table",
               **_) -> Iterator:
    """`--table`: a .csv/.jsonl with an image path column and a report column; relative image paths
    are resolved against `--root` (default: the table's folder)."""
    if table is None:
        raise ValueError("table needs --table (a .csv or .jsonl file)")
    from open_clip_cxr.reports.tables import iter_table
    cols = _conventional(table, {"study_col": study_col, "patient_col": patient_col, "split_col": split_col})
    study_col, patient_col, split_col = cols["study_col"], cols["patient_col"], cols["split_col"]
    base = Path(root) if root else Path(table).resolve().parent
    errors: List[Skipped] = []
    if study_col is not None:  # without a study column a repeated row repeats a key: counted as duplicate-key
        yield from _duplicate_rows(table, study_col, image_col, source)
    rows = iter_table(table, image_col=image_col, report_col=report_col, findings_col=findings_col,
                      impression_col=impression_col, study_col=study_col, patient_col=patient_col,
                      split_col=split_col, on_error=error_collector(errors, source), source=source)
    for report in rows:
        yield from errors
        errors.clear()
        if split_col is None:
            report.split = None  # no split column: the split rule hashes the patient (or study)
        for img in report.images:
            p = Path(img["path"])
            img["path"] = str(p if p.is_absolute() else base / p)
        yield report
    yield from errors


def iter_table_source(table, *, root=None, image_col="image", report_col="report", findings_col=None,
                      impression_col=None, study_col=None, patient_col=None, split_col=None,
                      source="table", val=0.1, test=0.1) -> Iterator[Record]:
    """The table's `Sample`s (one per image) and `Skipped`s, under the source name `source`."""
    return expand_samples(read_table(table, root=root, image_col=image_col, report_col=report_col,
                                     findings_col=findings_col, impression_col=impression_col, study_col=study_col,
                                     patient_col=patient_col, split_col=split_col, source=source), val=val, test=test)
