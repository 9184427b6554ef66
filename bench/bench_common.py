"""Shared pieces of the data benchmarks: real radiographs, hand-written reports, timing, tables."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from open_clip_cxr.data.sources import Sample  # noqa: E402
from open_clip_cxr.reports.types import Report  # noqa: E402

FINDINGS = ["The heart is normal in size. The lungs are clear.",
            "Patchy right lower lobe opacity. No effusion.",
            "Small left pleural effusion. Mild cardiomegaly.",
            "Diffuse interstitial markings. No focal consolidation."]
IMPRESSIONS = ["No acute process.", "Right lower lobe pneumonia.", "Small left effusion.", "Mild edema."]


def real_images(extra_dir: Optional[str] = None) -> List[Path]:
    """The 16 paediatric chest JPEGs, the adult PA DICOM, and optionally PNGs of `extra_dir`."""
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None:
        sys.exit("pneumonia-model-package is not installed (see requirements-assets.txt)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "pneumonia-data" / "val"
    paths = sorted(folder.rglob("*.jpeg"))
    import pydicom.data
    dcm = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    if dcm:
        paths.append(Path(dcm))
    if extra_dir and Path(extra_dir).is_dir():
        paths += sorted(Path(extra_dir).glob("*.png"))
    return paths


def make_samples(n: int, images: List[Path]) -> List[Sample]:
    """`n` samples cycling over the real images (unique keys; 2 images per study)."""
    out = []
    for i in range(n):
        k = (i // 2) % len(FINDINGS)
        report = Report(study_id=f"s{i // 2:06d}", source="bench", findings=FINDINGS[k], impression=IMPRESSIONS[k],
                        text=f"{FINDINGS[k]} {IMPRESSIONS[k]}", patient_id=f"p{i // 4:06d}")
        out.append(Sample("bench", report.study_id, f"im{i:06d}", str(images[i % len(images)]), report,
                          "train", patient_id=report.patient_id, view="PA"))
    return out


def _cpu() -> float:
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Timer:
    """Wall seconds and CPU seconds (this process + reaped children): on a shared machine the
    CPU time per image is the steadier number."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = _cpu() - self.c0


def print_table(title: str, header: List[str], rows: List[list]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def machine() -> str:
    return f"{os.cpu_count()} CPU(s) visible, python {sys.version.split()[0]}"
