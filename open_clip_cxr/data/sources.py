"""The built-in report sources: MIMIC-CXR-JPG, CheXpert Plus and Open-I (the `table` source is in
`table_source`, the `shards` source in `shard_reports`). Each reader yields one `Report` per
study, with its images' resolved paths, or `Skipped` records; `registry` turns them into shard
samples or split-filtered reports. Sources only read metadata and report text; images are opened
later, in the shard writer's worker processes.

Splits: the official split where the dataset has one (MIMIC-CXR split csv, the CheXpert Plus
`split` column, a table's split column), else `hash_split` of the patient id (study id when
the source has no patients), so that no patient straddles train and test
(`open_clip_cxr.reports.splits`, the one place the rule is written).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

from open_clip_cxr.data.records import (  # noqa: F401  (this module is where callers have found them)
    BAD_REPORT, DUPLICATE_KEY, DUPLICATE_ROW, EMPTY_REPORT, MISSING_FILE, MISSING_REPORT, NO_IMAGE,
    NON_UTF8_REPORT, NOT_A_FILE, UNREADABLE_IMAGE, Record, Sample, Skipped, classify_report_error, dumps,
    error_collector, make_key, report_problem, sample_meta)
from open_clip_cxr.data.registry import expand_samples, iter_reports, iter_source, register_source  # noqa: F401
from open_clip_cxr.data.tables_io import find_table, read_csv
from open_clip_cxr.reports.splits import normalise_split  # noqa: F401
from open_clip_cxr.reports.types import Report


def _parsers():
    # imported lazily so that `open-clip-cxr shards --help` stays fast
    from open_clip_cxr.reports import parsers
    return parsers


# ---------------------------------------------------------------- MIMIC-CXR-JPG

def _mimic_labels(path: Optional[Path]) -> Dict[str, Dict[str, float]]:
    """study_id -> {finding: 1.0 / 0.0 / -1.0}; blank cells (not mentioned) are left out."""
    labels: Dict[str, Dict[str, float]] = {}
    if path is None:
        return labels
    for row in read_csv(path):
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
    if report_problem(report):
        return Skipped(where, EMPTY_REPORT, f"{path}: no text after cleaning")
    return report


def _mimic_rows(root: Path):
    """(subject, study, dicom, official split or None), sorted by study then image."""
    split_path = find_table(root, "mimic-cxr-2.0.0-split")
    if split_path:
        rows = [(r["subject_id"], r["study_id"], r["dicom_id"], normalise_split(r["split"])) for r in read_csv(split_path)]
    else:   # no split csv: images are found by walking `files/`, and split by patient
        rows = [(jpg.parent.parent.name[1:], jpg.parent.name[1:], jpg.stem, None)
                for jpg in (root / "files").glob("p*/p*/s*/*.jpg")]
    return sorted(rows, key=lambda r: (r[1], r[2]))


@register_source("mimic-cxr", path_arg="root")
def read_mimic_cxr(root=None, reports=None, *, views=None, **_) -> Iterator[Union[Report, Skipped]]:
    """`--root`: MIMIC-CXR-JPG (`files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`, the official csv.gz tables).

    `reports` is the folder holding `files/pXX/pSUBJECT/sSTUDY.txt` (the unzipped
    mimic-cxr-reports); by default `root/mimic-cxr-reports`, else `root` itself.
    """
    if root is None:
        raise ValueError("mimic-cxr needs --root (the MIMIC-CXR-JPG folder)")
    root = Path(root)
    rep_root = Path(reports) if reports else (root / "mimic-cxr-reports" if (root / "mimic-cxr-reports").exists() else root)
    if not (rep_root / "files").exists() and (rep_root / "mimic-cxr-reports" / "files").exists():
        rep_root = rep_root / "mimic-cxr-reports"
    meta_path = find_table(root, "mimic-cxr-2.0.0-metadata")
    view_of = {r["dicom_id"]: (r.get("ViewPosition") or None) for r in read_csv(meta_path)} if meta_path else {}
    labels = _mimic_labels(find_table(root, "mimic-cxr-2.0.0-chexpert"))
    wanted = {v.upper() for v in views} if views else None
    studies: Dict[str, list] = {}
    for subject, study, dicom, split in _mimic_rows(root):
        if wanted is None or (view_of.get(dicom) or "").upper() in wanted:
            studies.setdefault(study, []).append((subject, dicom, split))
    reader = _parsers().read_mimic_txt
    for study, rows in studies.items():
        subject = rows[0][0]
        rel = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        report = _read_report_bytes(rep_root / rel.parent / f"s{study}.txt", study, subject, reader)
        if isinstance(report, Skipped):
            for _, dicom, _ in rows:
                yield Skipped(make_key("mimic-cxr", study, dicom), report.reason, report.detail)
            continue
        report.images = [{"id": dicom, "path": str(root / rel / f"{dicom}.jpg"), "view": view_of.get(dicom)}
                         for _, dicom, _ in rows]
        report.split, report.patient_id = rows[0][2], subject
        report.labels = labels.get(study, dict(report.labels))
        yield report


def iter_mimic_cxr(root, reports=None, *, views=None, val=0.1, test=0.1) -> Iterator[Record]:
    """MIMIC-CXR-JPG samples (see `read_mimic_cxr`)."""
    return expand_samples(read_mimic_cxr(root, reports, views=views), views=views, val=val, test=test)


# ---------------------------------------------------------------- CheXpert Plus

def _resolve_chexpert_image(root: Path, rel: str) -> Path:
    """The csv names `.jpg` files; the PNG release keeps the same tree under `PNG/` with `.png`."""
    rel_path = Path(rel)
    for cand in (root / rel_path, root / rel_path.with_suffix(".png"),
                 root / "PNG" / rel_path.with_suffix(".png"), root / "PNG" / rel_path):
        if cand.exists():
            return cand
    return root / rel_path


@register_source("chexpert-plus", path_arg="table")
def read_chexpert_plus(table=None, root=None, **_) -> Iterator[Union[Report, Skipped]]:
    """`--table`: the CheXpert Plus report csv (one row per image); `--root`: the image folder it
    refers to (default: the csv's folder)."""
    if table is None:
        raise ValueError("chexpert-plus needs --table (the report csv) and --root (the image folder)")
    root = Path(root) if root else Path(table).parent
    errors: List[Skipped] = []
    for report in _parsers().iter_chexpert_plus_csv(table, on_error=error_collector(errors, "chexpert-plus")):
        yield from errors
        errors.clear()
        for img in report.images:
            img["path"] = str(_resolve_chexpert_image(root, img["path"]))
        yield report
    yield from errors


def iter_chexpert_plus(table, root, *, views=None, val=0.1, test=0.1) -> Iterator[Record]:
    """CheXpert Plus samples (see `read_chexpert_plus`)."""
    return expand_samples(read_chexpert_plus(table, root), views=views, val=val, test=test)


# ---------------------------------------------------------------- Open-I

@register_source("openi", path_arg="reports")
def read_openi(reports=None, root=None, *, for_images=False, **_) -> Iterator[Union[Report, Skipped]]:
    """`--reports`: the NLMCXR tgz or a folder of Open-I XML (default: the copy in the
    torchxrayvision wheel); `--root`: the folder of `<id>.png` images (only for shards)."""
    if for_images and (reports is None or root is None):
        raise ValueError("openi needs --reports (tgz or XML folder) and --root (the PNG folder)")
    parsers = _parsers()
    errors: List[Skipped] = []
    if reports is not None and Path(reports).is_dir():
        def parsed():
            for xml in sorted(Path(reports).rglob("*.xml")):
                try:
                    yield parsers.read_openi_xml(xml)
                except ValueError as exc:
                    errors.append(Skipped(make_key("openi", xml.stem), classify_report_error(exc), str(exc)[:300]))
        stream = parsed()
    else:
        stream = parsers.iter_openi_tgz(reports, on_error=error_collector(errors, "openi"))
    for report in stream:
        yield from errors
        errors.clear()
        report.split = None  # Open-I has no official split: the split rule hashes the study
        for img in report.images:
            img["path"] = str(Path(root) / f"{img['id']}.png") if root is not None else None
        yield report
    yield from errors


def iter_openi(reports, images, *, val=0.1, test=0.1) -> Iterator[Record]:
    """Open-I samples (see `read_openi`)."""
    return expand_samples(read_openi(reports, images, for_images=True), val=val, test=test)


from open_clip_cxr.data.table_source import (  # noqa: E402,F401  (the table source, found here as before)
    CONVENTIONAL_COLUMNS, iter_table_source, resolve_table_columns, table_columns)
