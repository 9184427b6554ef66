"""Stage 1's data: the reports of a split, and which of them each micro-batch reads.

`load_reports` and `_reports_from_shards` read reports for stage 1 and its evaluation;
`StepData` makes the batch order a pure function of (seed, micro-batch), so a resumed run
reads what an uninterrupted one would.
"""
import random
from typing import Dict, List, Optional


TABLE_KEYS = ("report_col", "findings_col", "impression_col", "study_col", "patient_col", "split_col")


def load_reports(data: dict, split: Optional[str]) -> list:
    """`Report`s of one split from `data`, through the source registry (`open_clip_cxr.data.registry`):
    `shards: <urls>` (txt/json of WebDataset shards, one report per study),
    `source: openi` (the Open-I tgz, `path:` optional), `source: table` with `path:` (a CSV/JSONL
    export; columns as `parsers.iter_table` names them), or any registered source."""
    from open_clip_cxr.data.registry import iter_reports
    source = "shards" if data.get("shards") else (data.get("source") or "openi")
    reports = list(iter_reports({**data, "source": source}, split or None))
    return reports[:data["limit"]] if data.get("limit") else reports


def _reports_from_shards(urls):
    """One `Report` per study from the shards' json (sections) and txt; images are not read."""
    from open_clip_cxr.data.shard_reports import read_shards
    return read_shards(urls)


class StepData:
    """Which reports micro-batch m of this process reads: a pure function of (seed, m), so a
    resumed run reads what an uninterrupted one would. Epochs are fresh permutations; with
    `neighbours` and `group` > 1, permutations made of runs of `group` lexical neighbours
    (`neighbour_batches.grouped_order`)."""

    def __init__(self, n: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 neighbours: Optional[List[List[int]]] = None, group: int = 1):
        self.n, self.bs, self.seed, self.world, self.rank = n, batch_size, seed, world_size, rank
        self.neighbours, self.group = neighbours, group
        self._perms: Dict[int, List[int]] = {}

    def _perm(self, epoch: int) -> List[int]:
        if epoch not in self._perms:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            if self.neighbours is not None and self.group > 1:
                from open_clip_cxr_train.neighbour_batches import grouped_order
                self._perms = {epoch: grouped_order(self.n, self.neighbours, self.group, rng)}
            else:
                self._perms = {epoch: rng.sample(range(self.n), self.n)}
        return self._perms[epoch]

    def __call__(self, micro: int):
        """[(epoch, report index)] of micro-batch `micro`."""
        start = (micro * self.world + self.rank) * self.bs
        return [(p // self.n, self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.bs)]
