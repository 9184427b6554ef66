"""Reading the csv / csv.gz tables dataset layouts ship (MIMIC-CXR metadata, user tables)."""
import csv
import gzip
import io
from pathlib import Path
from typing import Iterator, Optional


def open_text_table(path: Path) -> io.TextIOBase:
    """Open a csv or csv.gz as text."""
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def find_table(root: Path, stem: str) -> Optional[Path]:
    """`root/stem.csv.gz` or `root/stem.csv`, whichever exists, else None."""
    for name in (stem + ".csv.gz", stem + ".csv"):
        if (root / name).exists():
            return root / name
    return None


def read_csv(path: Path) -> Iterator[dict]:
    """The rows of a csv / csv.gz as dicts."""
    with open_text_table(path) as f:
        yield from csv.DictReader(f)
