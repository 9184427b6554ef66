"""Shared pieces of the benchmark scripts: real radiographs, hand-written reports, timing (median,
interleaved, wall + CPU), peak memory, tables, and the machine a number was measured on.

torch is imported only by the helpers that need it, so the data benchmarks stay torch-free."""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
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


def cpu_name() -> str:
    """The CPU's model name (`lscpu`), else what `platform` knows."""
    import platform
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:  # noqa: BLE001  (no lscpu, or no "Model name" line)
        return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    """Where a number was measured: the CPU, CPUs visible, python, and torch threads/version once loaded."""
    text = f"{cpu_name()}, {os.cpu_count()} CPU(s) visible, python {sys.version.split()[0]}"
    torch = sys.modules.get("torch")
    if torch is not None:
        text += f", {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    return text


# ---------------------------------------------------------------- timing, memory, tables (model benchmarks)

def timeit(fn, repeat=5, warmup=1):
    """Median wall seconds of `fn()` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def timeit_interleaved(fns: dict, repeat=5, warmup=1) -> dict:
    """Median seconds of each `fns[name]()`, measured round-robin so load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_isolated(code: str) -> dict:
    """Run `code` in a fresh interpreter (so peak memory is its own); it prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows, headers):
    """A plain-text table (left-aligned columns), as a string."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])
