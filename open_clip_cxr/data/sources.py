"""Turn each dataset's on-disk layout into a flat stream of one-image `Sample`s.

Every source yields `Sample` (one image + the report of its study) or `Skipped` (an input
the shard writer must count but cannot use, e.g. a report that is not UTF-8). Sources only
read metadata and report text; images are opened later, in the writer's worker processes.

Splits: the official split where the dataset has one (MIMIC-CXR split csv, the CheXpert Plus
`split` column, a table's split column), else `hash_split` of the patient id (study id when
the source has no patients), so that no patient straddles train and test.
"""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

from open_clip_cxr.reports.types import Report

# Why a sample was left out; the writer's manifest counts these names.
MISSING_FILE = "missing-file"
UNREADABLE_IMAGE = "unreadable-image"
EMPTY_REPORT = "empty-report"
NON_UTF8_REPORT = "non-utf8-report"
MISSING_REPORT = "missing-report"
BAD_REPORT = "bad-report"
NO_IMAGE = "no-image"
DUPLICATE_KEY = "duplicate-key"
DUPLICATE_ROW = "duplicate-row"
NOT_A_FILE = "not-a-file"

SOURCES = ("mimic-cxr", "chexpert-plus", "openi", "table")
_SPLIT_ALIASES = {"val": "validate", "valid": "validate", "validation": "validate", "dev": "validate",
                  "training": "train", "testing": "test"}


@dataclass
class Sample:
    """One image with the report of its study: the unit written to a shard."""
    source: str
    study_id: str
    image_id: str
    image_path: str
    report: Report
    split: str
    patient_id: Optional[str] = None
    view: Optional[str] = None
    labels: Dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return make_key(self.source, self.study_id, self.image_id)


@dataclass
class Skipped:
    """An input the writer leaves out, with the reason the manifest reports."""
    key: str
    reason: str
    detail: str = ""


Record = Union[Sample, Skipped]


def make_key(*parts: str) -> str:
    """A WebDataset-safe key: no dots (they start the extension) and no slashes (they nest)."""
    return "_".join(re.sub(r"[^A-Za-z0-9-]+", "-", str(p)).strip("-") or "x" for p in parts)


def normalise_split(split: Optional[str]) -> Optional[str]:
    """Map the many spellings of a split to "train" / "validate" / "test"."""
    if split is None or not str(split).strip():
        return None
    s = str(split).strip().lower()
    return _SPLIT_ALIASES.get(s, s)


def _hash_split(key: str, val: float, test: float) -> str:
    from open_clip_cxr.reports.parsers import hash_split
    return normalise_split(hash_split(key, val=val, test=test))


def _parsers():
    # imported lazily so that `open-clip-cxr shards --help` stays fast
    from open_clip_cxr.reports import parsers
    return parsers


def classify_report_error(exc: BaseException) -> str:
    """Map a parser's error to a manifest skip reason (the parsers raise one ReportError type)."""
    msg = str(exc).lower()
    if isinstance(exc, UnicodeDecodeError) or "utf-8" in msg:
        return NON_UTF8_REPORT
    if "empty" in msg:
        return EMPTY_REPORT
    if "not found" in msg:
        return MISSING_REPORT
    return BAD_REPORT


def _error_collector(out: List[Skipped], source: str) -> Callable:
    """An `on_error` callback for the report parsers that turns each error into a `Skipped`."""
    counter = itertools.count()

    def on_error(exc):
        out.append(Skipped(make_key(source, f"report-error-{next(counter)}"), classify_report_error(exc),
                           str(exc)[:300]))
    return on_error


def _report_problem(report: Report) -> Optional[str]:
    return EMPTY_REPORT if not (report.text or "").strip() else None


# ---------------------------------------------------------------- small readers

def _open_text_table(path: Path) -> io.TextIOBase:
    """Open a csv or csv.gz as text."""
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _find_table(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".csv.gz", stem + ".csv"):
        if (root / name).exists():
            return root / name
    return None


def _read_csv(path: Path) -> Iterator[dict]:
    with _open_text_table(path) as f:
        yield from csv.DictReader(f)


# ---------------------------------------------------------------- MIMIC-CXR-JPG

def _mimic_labels(path: Optional[Path]) -> Dict[str, Dict[str, float]]:
    """study_id -> {finding: 1.0 / 0.0 / -1.0}; blank cells (not mentioned) are left out."""
    labels: Dict[str, Dict[str, float]] = {}
    if path is None:
        return labels
    for row in _read_csv(path):
        study = row.pop("study_id")
        row.pop("subject_id", None)
        labels[study] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return labels


def _read_report_bytes(path: Path, study_id: str, patient_id: str, reader: Callable) -> Union[Report, Skipped]:
    """Read one report file, classifying each way it can fail."""
    where = make_key(study_id)
    if not path.exists():
        return Skipped(where, MISSING_REPORT, str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return Skipped(where, NON_UTF8_REPORT, f"{path}: {exc}")
    if not text.strip():
        return Skipped(where, EMPTY_REPORT, str(path))
    try:
        report = reader(text, study_id=study_id, patient_id=patient_id)
    except ValueError as exc:  # ReportError is a ValueError
        return Skipped(where, classify_report_error(exc), f"{path}: {exc}"[:300])
    if _report_problem(report):
        return Skipped(where, EMPTY_REPORT, f"{path}: no text after cleaning")
    return report


def iter_mimic_cxr(root, reports=None, *, views=None, val=0.1, test=0.1) -> Iterator[Record]:
    """MIMIC-CXR-JPG: `root/files/pXX/pSUBJECT/sSTUDY/DICOM.jpg` and the official csv.gz tables.

    `reports` is the folder holding `files/pXX/pSUBJECT/sSTUDY.txt` (the unzipped
    mimic-cxr-reports); by default `root/mimic-cxr-reports`, else `root` itself.
    Without the split csv, images are found by walking `files/` and split by patient.
    """
    root = Path(root)
    rep_root = Path(reports) if reports else (root / "mimic-cxr-reports" if (root / "mimic-cxr-reports").exists() else root)
    if not (rep_root / "files").exists() and (rep_root / "mimic-cxr-reports" / "files").exists():
        rep_root = rep_root / "mimic-cxr-reports"
    view_of = {}
    meta_path = _find_table(root, "mimic-cxr-2.0.0-metadata")
    if meta_path:
        view_of = {r["dicom_id"]: (r.get("ViewPosition") or None) for r in _read_csv(meta_path)}
    labels = _mimic_labels(_find_table(root, "mimic-cxr-2.0.0-chexpert"))
    split_path = _find_table(root, "mimic-cxr-2.0.0-split")
    if split_path:
        rows = [(r["subject_id"], r["study_id"], r["dicom_id"], normalise_split(r["split"])) for r in _read_csv(split_path)]
    else:
        rows = []
        for jpg in sorted((root / "files").glob("p*/p*/s*/*.jpg")):
            subject, study = jpg.parent.parent.name[1:], jpg.parent.name[1:]
            rows.append((subject, study, jpg.stem, None))
    wanted = {v.upper() for v in views} if views else None
    reader = _parsers().read_mimic_txt
    cache: Dict[str, Union[Report, Skipped]] = {}
    for subject, study, dicom, split in sorted(rows, key=lambda r: (r[1], r[2])):
        view = view_of.get(dicom)
        if wanted is not None and (view or "").upper() not in wanted:
            continue
        rel = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        if study not in cache:
            cache[study] = _read_report_bytes(rep_root / rel.parent / f"s{study}.txt", study, subject, reader)
        report = cache[study]
        key = make_key("mimic-cxr", study, dicom)
        if isinstance(report, Skipped):
            yield Skipped(key, report.reason, report.detail)
            continue
        yield Sample("mimic-cxr", study, dicom, str(root / rel / f"{dicom}.jpg"), report,
                     split or _hash_split(subject, val, test), patient_id=subject, view=view,
                     labels=labels.get(study, dict(report.labels)))


# ---------------------------------------------------------------- CheXpert Plus

def _resolve_chexpert_image(root: Path, rel: str) -> Path:
    """The csv names `.jpg` files; the PNG release keeps the same tree under `PNG/` with `.png`."""
    rel_path = Path(rel)
    for cand in (root / rel_path, root / rel_path.with_suffix(".png"),
                 root / "PNG" / rel_path.with_suffix(".png"), root / "PNG" / rel_path):
        if cand.exists():
            return cand
    return root / rel_path


def iter_chexpert_plus(table, root, *, views=None, val=0.1, test=0.1) -> Iterator[Record]:
    """CheXpert Plus: the report csv (one row per image) and the image root it refers to."""
    root = Path(root)
    errors: List[Skipped] = []
    wanted = {v.upper() for v in views} if views else None
    for report in _parsers().iter_chexpert_plus_csv(table, on_error=_error_collector(errors, "chexpert-plus")):
        yield from errors
        errors.clear()
        yield from _report_samples(report, "chexpert-plus", wanted, val, test,
                                   lambda img: _resolve_chexpert_image(root, img["path"]))
    yield from errors


def _image_id_from_path(path: str) -> str:
    return Path(path).stem


def _report_samples(report: Report, source: str, wanted, val, test, locate) -> Iterator[Record]:
    """One sample per image of a parsed report."""
    study_key = make_key(source, report.study_id)
    if _report_problem(report):
        yield Skipped(study_key, EMPTY_REPORT, f"study {report.study_id}")
        return
    if not report.images:
        yield Skipped(study_key, NO_IMAGE, f"study {report.study_id} lists no image")
        return
    split = normalise_split(report.split) or _hash_split(report.patient_id or report.study_id, val, test)
    for img in report.images:
        view = img.get("view")
        if img.get("ap_pa") and (view or "").lower() != "lateral":
            view = img["ap_pa"]  # CheXpert Plus: "Frontal" + "PA" -> "PA", like MIMIC's ViewPosition
        if wanted is not None and (view or "").upper() not in wanted:
            continue
        image_id = img.get("id") or _image_id_from_path(img["path"])
        yield Sample(source, str(report.study_id), str(image_id), str(locate(img)), report, split,
                     patient_id=report.patient_id, view=view, labels=dict(report.labels))


# ---------------------------------------------------------------- Open-I

def iter_openi(reports, images, *, val=0.1, test=0.1) -> Iterator[Record]:
    """Open-I (IU X-ray): reports as the NLMCXR tgz or a folder of XML; images as `<id>.png`."""
    parsers = _parsers()
    images = Path(images)
    errors: List[Skipped] = []
    reports = Path(reports)
    if reports.is_dir():
        def parsed():
            for xml in sorted(reports.rglob("*.xml")):
                try:
                    yield parsers.read_openi_xml(xml)
                except ValueError as exc:
                    errors.append(Skipped(make_key("openi", xml.stem), classify_report_error(exc), str(exc)[:300]))
        stream = parsed()
    else:
        stream = parsers.iter_openi_tgz(reports, on_error=_error_collector(errors, "openi"))
    for report in stream:
        yield from errors
        errors.clear()
        report.split = None  # Open-I has no official split: hash the study with our val/test shares
        yield from _report_samples(report, "openi", None, val, test,
                                   lambda img: images / f"{img['id']}.png")
    yield from errors


# ---------------------------------------------------------------- generic CSV / JSONL

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
    with _open_text_table(path) as f:
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
    for where, row in _parsers()._iter_rows(table):
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


def iter_table_source(table, *, root=None, image_col="image", report_col="report", findings_col=None,
                      impression_col=None, study_col=None, patient_col=None, split_col=None,
                      source="table", val=0.1, test=0.1) -> Iterator[Record]:
    """A CSV / JSONL with an image path column and a report column (one row per image).

    Relative image paths are resolved against `root`, by default the table's folder.
    """
    base = Path(root) if root else Path(table).resolve().parent
    errors: List[Skipped] = []
    if study_col is not None:  # without a study column a repeated row repeats a key: counted as duplicate-key
        yield from _duplicate_rows(table, study_col, image_col, source)
    rows = _parsers().iter_table(table, image_col=image_col, report_col=report_col, findings_col=findings_col,
                                 impression_col=impression_col, study_col=study_col, patient_col=patient_col,
                                 split_col=split_col, on_error=_error_collector(errors, source), source=source)
    for report in rows:
        yield from errors
        errors.clear()
        if split_col is None:
            report.split = None  # no split column: hash the patient (or study) with our val/test shares

        def locate(img):
            p = Path(img["path"])
            return p if p.is_absolute() else base / p
        yield from _report_samples(report, source, None, val, test, locate)
    yield from errors


def iter_source(name: str, *, root=None, reports=None, table=None, views=None, val=0.1, test=0.1,
                **table_columns) -> Iterator[Record]:
    """Dispatch on the `--source` name; see each `iter_*` for the layout it reads."""
    for label, path in (("--root", root), ("--reports", reports), ("--table", table)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{label} {path} does not exist")
    if name == "mimic-cxr":
        return iter_mimic_cxr(root, reports, views=views, val=val, test=test)
    if name == "chexpert-plus":
        if table is None:
            raise ValueError("chexpert-plus needs --table (the report csv) and --root (the image folder)")
        return iter_chexpert_plus(table, root or Path(table).parent, views=views, val=val, test=test)
    if name == "openi":
        if reports is None or root is None:
            raise ValueError("openi needs --reports (tgz or XML folder) and --root (the PNG folder)")
        return iter_openi(reports, root, val=val, test=test)
    if name == "table":
        if table is None:
            raise ValueError("table needs --table (a .csv or .jsonl file)")
        return iter_table_source(table, root=root, val=val, test=test, **table_columns)
    raise ValueError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")


def sample_meta(sample: Sample) -> dict:
    """The json record stored next to the image (variants are added by the writer)."""
    r = sample.report
    return {"source": sample.source, "study_id": sample.study_id, "image_id": sample.image_id,
            "patient_id": sample.patient_id, "view": sample.view, "split": sample.split,
            "sections": {"findings": r.findings or "", "impression": r.impression or ""},
            "labels": sample.labels}


def dumps(obj) -> bytes:
    """Deterministic json bytes (sorted keys): identical inputs give identical shards."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")
