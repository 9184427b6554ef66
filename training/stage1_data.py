"""Stage 1's data: the reports of a split, and which of them each micro-batch reads.

`load_reports` and `_reports_from_shards` read reports for stage 1 and its evaluation;
`StepData` makes the batch order a pure function of (seed, micro-batch), so a resumed run
reads what an uninterrupted one would.
"""
import json
import random
from typing import Dict, List, Optional


TABLE_KEYS = ("report_col", "findings_col", "impression_col", "study_col", "patient_col", "split_col")


def load_reports(data: dict, split: Optional[str]) -> list:
    """`Report`s of one split from `data`:
    `shards: <urls>` (txt/json of WebDataset shards, one report per study),
    `source: openi` (the Open-I tgz, `path:` optional; split by `hash_split` of the study id), or
    `source: table` with `path:` (a CSV/JSONL export; columns as `parsers.iter_table` names them)."""
    from open_clip_cxr.reports import parsers
    limit, source = data.get("limit"), data.get("source", "openi")
    if data.get("shards"):
        reports = list(_reports_from_shards(data["shards"]))
    elif source == "openi":
        reports = list(parsers.iter_openi_tgz(data.get("path"), on_error=lambda e: None))
    elif source == "table":
        cols = {k: data[k] for k in TABLE_KEYS if data.get(k)}
        reports = list(parsers.iter_table(data["path"], on_error=lambda e: None, **cols))
    else:
        raise ValueError(f"data: give `shards:` or `source: openi|table`, got {data}")
    hash_split = parsers.hash_split
    if split:
        reports = [r for r in reports if (r.split or hash_split(r.study_id)) == split]
    return reports[:limit] if limit else reports


def _reports_from_shards(urls):
    """One `Report` per study from the shards' json (sections) and txt; images are not read."""
    import webdataset as wds
    from open_clip_cxr.data.loader import expand_urls
    from open_clip_cxr.reports.types import Report
    seen = set()
    for s in wds.DataPipeline(wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples()):
        if "json" not in s:
            continue
        meta = json.loads(s["json"])
        sid = str(meta.get("study_id") or s["__key__"])
        if sid in seen:       # one sample per image: several per study
            continue
        seen.add(sid)
        sec = meta.get("sections") or {}
        yield Report(study_id=sid, source=meta.get("source", "shards"), findings=sec.get("findings", ""),
                     impression=sec.get("impression", ""), text=s.get("txt", b"").decode("utf-8"),
                     split=meta.get("split"), patient_id=meta.get("patient_id"))


class StepData:
    """Which reports micro-batch m of this process reads: a pure function of (seed, m), so a
    resumed run reads what an uninterrupted one would. Epochs are fresh permutations."""

    def __init__(self, n: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0):
        self.n, self.bs, self.seed, self.world, self.rank = n, batch_size, seed, world_size, rank
        self._perms: Dict[int, List[int]] = {}

    def _perm(self, epoch: int) -> List[int]:
        if epoch not in self._perms:
            self._perms = {epoch: random.Random(self.seed * 1_000_003 + epoch).sample(range(self.n), self.n)}
        return self._perms[epoch]

    def __call__(self, micro: int):
        """[(epoch, report index)] of micro-batch `micro`."""
        start = (micro * self.world + self.rank) * self.bs
        return [(p // self.n, self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.bs)]
