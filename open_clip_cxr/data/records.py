"""The records a source yields on the way to the shard writer: `Sample` (one image + the report
of its study) or `Skipped` (an input the writer must count but cannot use, with the reason the
manifest reports), and the helpers that make them."""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

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


def error_collector(out: List[Skipped], source: str) -> Callable:
    """An `on_error` callback for the report parsers that turns each error into a `Skipped`."""
    counter = itertools.count()

    def on_error(exc):
        out.append(Skipped(make_key(source, f"report-error-{next(counter)}"), classify_report_error(exc),
                           str(exc)[:300]))
    return on_error


def report_problem(report: Report) -> Optional[str]:
    return EMPTY_REPORT if not (report.text or "").strip() else None


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
