"""Readers of tabular report sources: generic CSV/TSV/JSONL hospital exports (`iter_table`) and
the CheXpert Plus CSV (`iter_chexpert_plus_csv`). Both group rows into one `Report` per study."""
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from .clean import clean_text
from .reading import OnError, PathLike, ReportError, _EMPTY, _Errors, _iter_rows, _make_report, _value
from .sections import report_fields
from .splits import hash_split, normalise_split
from .types import Report


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
                            split=normalise_split(split) or hash_split(patient or study_id))

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
                s["split"] = normalise_split(_value(row, "split"))
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
