"""Report text read back from WebDataset shards, without decoding images: the `shards` source
(one `Report` per study, for stage 1 and eval) and `iter_shard_texts` (every sample's key, text
and metadata, for the cached-text mode)."""
from __future__ import annotations

import json
from typing import Iterator, Optional, Tuple

from open_clip_cxr.data.registry import register_source
from open_clip_cxr.reports.types import Report


def iter_shard_texts(urls) -> Iterator[Tuple[str, Optional[str], dict]]:
    """(sample key, report txt or None when the sample has none, json metadata) of every sample of
    `urls` that has a txt or a json."""
    import webdataset as wds
    from open_clip_cxr.data.loader import expand_urls
    for s in wds.DataPipeline(wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples()):
        if "txt" not in s and "json" not in s:
            continue
        meta = json.loads(s["json"]) if "json" in s else {}
        yield s["__key__"], s["txt"].decode("utf-8") if "txt" in s else None, meta


@register_source("shards", path_arg="shards", images=False)
def read_shards(shards=None, **_) -> Iterator[Report]:
    """`shards:`: WebDataset shards written by `open-clip-cxr shards` (one report per study, from
    each sample's json sections and txt; the split recorded at writing)."""
    if not shards:
        raise ValueError("the shards source needs `shards:` (shard urls, e.g. DIR/train-{000000..000003}.tar)")
    seen = set()
    for key, text, meta in iter_shard_texts(shards):
        if not meta:
            continue
        sid = str(meta.get("study_id") or key)
        if sid in seen:       # one sample per image: several per study
            continue
        seen.add(sid)
        sec = meta.get("sections") or {}
        yield Report(study_id=sid, source=meta.get("source", "shards"), findings=sec.get("findings", ""),
                     impression=sec.get("impression", ""), text=text or "",
                     split=meta.get("split"), patient_id=meta.get("patient_id"))
