"""Shared by tests/test_search_*.py: a small archive of real package films written as shards, and a build helper."""
import csv
from pathlib import Path

from data_fixtures import REPORTS, jpeg_paths, small_copy


def write_archive(root: Path, first: int, n: int, split: str = "test") -> Path:
    """n images, two per study (studies s{first//2}...), as a table and as shards of 3 samples."""
    from open_clip_cxr.data.shard_writer import EncodeOptions, ShardLimits, write_shards
    from open_clip_cxr.data.sources import iter_table_source
    jp = jpeg_paths()
    rows = []
    for i in range(first, first + n):
        rel = f"imgs/img{i}.png"
        small_copy(jp[i % len(jp)], root / rel, side=96)
        findings, impression = REPORTS[(i // 2) % len(REPORTS)]
        rows.append({"image": rel, "report": f"FINDINGS: {findings} IMPRESSION: {impression}",
                     "study": f"s{i // 2}", "patient": f"p{i // 4}", "split": split})
    table = root / f"table{first}.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = root / f"shards{first}"
    write_shards(iter_table_source(table, study_col="study", patient_col="patient", split_col="split"), out,
                 options=EncodeOptions(max_side=96), limits=ShardLimits(samples_per_shard=3), progress=False,
                 workers=1)
    return out


def build(tiny, out, urls, **kw):
    from open_clip_cxr.search.build import build_index, shard_sources
    model, preprocess, tokenizer = tiny
    kw.setdefault("chunk_size", 2)
    return build_index(out, shard_sources(urls), model=model, preprocess=preprocess, tokenizer=tokenizer,
                       model_name="cxr-llm-tiny", progress=False, log=lambda m: None, **kw)
