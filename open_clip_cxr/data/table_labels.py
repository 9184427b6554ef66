"""Per-image labels from a table source's own columns, stored in the shards' metadata.

`shards --source table --label-cols Cardiomegaly Edema ...` reads those columns of each row and
stores them as the image's `labels` (the same place MIMIC-CXR's CheXpert labels go), so that
`eval --task zeroshot --labels Cardiomegaly Edema` can score them. A value is kept when it reads
as a number (1 positive, 0 negative, -1 uncertain, as in CheXpert) or as yes/no, true/false,
positive/negative; an empty cell is no label.
"""
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

_WORDS = {"yes": 1.0, "true": 1.0, "positive": 1.0, "pos": 1.0, "no": 0.0, "false": 0.0, "negative": 0.0,
          "neg": 0.0, "uncertain": -1.0}


def label_value(v) -> Optional[float]:
    """1/0/-1 (or any number) as a float, yes/no-like words as 1/0, anything else None."""
    if v is None or isinstance(v, (list, dict)):
        return None
    s = str(v).strip().lower()
    if not s:
        return None
    try:
        x = float(s)
    except ValueError:
        return _WORDS.get(s)
    return None if x != x else x   # NaN: no label


def read_table_labels(table, label_cols: Sequence[str], image_col: str = "image",
                      root=None) -> Dict[str, Dict[str, float]]:
    """{resolved image path: {column: value}} for every row's images; ValueError for unknown columns."""
    from open_clip_cxr.reports import reading, tables
    base = Path(root) if root else Path(table).resolve().parent
    seen_cols: set = set()
    out: Dict[str, Dict[str, float]] = {}
    for _, row in reading._iter_rows(table):
        if not isinstance(row, dict):
            continue   # a bad row: the source reports it as skipped
        lower = {str(k).lower().strip(): k for k in row}
        seen_cols.update(row)
        labels = {}
        for col in label_cols:
            key = col if col in row else lower.get(col.lower().strip())
            v = label_value(row.get(key)) if key is not None else None
            if v is not None:
                labels[col] = v
        for img in tables._images(row.get(image_col)):
            p = Path(img)
            out.setdefault(str(p if p.is_absolute() else base / p), {}).update(labels)
    have = {str(c).lower().strip() for c in seen_cols}
    missing = [c for c in label_cols if c.lower().strip() not in have]
    if missing:
        cols = ", ".join(sorted(map(str, seen_cols))[:20]) or "none"
        raise ValueError(f"--table {table} has no column {', '.join(map(repr, missing))} (--label-cols); "
                         f"its columns are {cols}")
    return out


def attach_table_labels(records: Iterable, table, label_cols: Sequence[str], image_col: str = "image",
                        root=None, counts: Optional[dict] = None) -> Iterator:
    """The records, each sample's `labels` filled from its table row (`counts`: images with / without)."""
    from open_clip_cxr.data.sources import Sample
    by_image = read_table_labels(table, label_cols, image_col=image_col, root=root)
    counts = counts if counts is not None else {}
    counts.setdefault("with_labels", 0)
    counts.setdefault("without_labels", 0)
    for rec in records:
        if isinstance(rec, Sample):
            labels = by_image.get(rec.image_path, {})
            rec.labels = {**rec.labels, **labels}
            counts["with_labels" if labels else "without_labels"] += 1
        yield rec


def label_names(metas: Iterable[Optional[dict]]) -> List[str]:
    """Every label name found in shard metadata records, in first-seen order."""
    names: Dict[str, None] = {}
    for m in metas:
        names.update(dict.fromkeys((m or {}).get("labels") or {}))
    return list(names)
