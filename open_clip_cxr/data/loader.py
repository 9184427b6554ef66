"""Stream CXR image-report shards into training batches, or into evaluation samples.

`make_loader(..., train=True)`: shards are resampled with replacement, each (rank, worker)
drawing its own seeded stream, samples go through a shuffle buffer, and an epoch is a
fixed number of batches (`loader.num_batches`), as OpenCLIP's training loop expects.

`make_loader(..., train=False)` and `SampleSource`: every sample exactly once across all
ranks and DataLoader workers. Shards are dealt out whole while they divide evenly; the
left-over shards (fewer than the number of ranks or workers) are read by all and split by
sample index modulo the number of readers. See `split_tasks`.

Distributed use with accelerate: do NOT pass these loaders to `accelerator.prepare()`.
accelerate wraps an IterableDataset loader with its own dispatch/sharding logic, which
either duplicates or drops WebDataset samples (huggingface/accelerate issues #3547, #4075).
The loader splits by rank itself: `world_size`/`rank` default to `torch.distributed` when
it is initialised, else the RANK/WORLD_SIZE environment variables, else a single process.
Batches stay on the CPU; the caller moves them to its device.

Urls: local paths, brace patterns (`dir/train-{000000..000009}.tar`, several joined by `::`), globs (`dir/train-*.tar`),
`pipe:` commands, http(s) (via curl) and `s3://` (via the aws cli), as WebDataset opens them.
A corrupt sample or a damaged shard is skipped with a warning and counted in
`loader.skipped.value` (shared with forked DataLoader workers).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import os
import random
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import webdataset as wds

from open_clip_cxr.data.manifest import count_samples
from open_clip_cxr.data.text_choice import choose_text, normalise_choice

log = logging.getLogger(__name__)
IMAGE_EXTS = ("png", "jpg", "jpeg")


# ---------------------------------------------------------------- urls and ranks

def expand_urls(urls: Union[str, Sequence[str]]) -> List[str]:
    """Brace patterns or globs (several joined by `::`), or a list of them -> the list of shard urls."""
    from open_clip_cxr.data.shard_check import expand_patterns
    return expand_patterns(urls)


def resolve_world(world_size: Optional[int] = None, rank: Optional[int] = None) -> Tuple[int, int]:
    """(world_size, rank): explicit values, else torch.distributed, else RANK/WORLD_SIZE, else (1, 0)."""
    ws, r = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ws, r = torch.distributed.get_world_size(), torch.distributed.get_rank()
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        ws, r = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    ws = ws if world_size is None else int(world_size)
    r = r if rank is None else int(rank)
    if ws < 1 or not 0 <= r < ws:
        raise ValueError(f"invalid rank {r} for world_size {ws}")
    return ws, r


def _worker() -> Tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _gopen_s3(url, mode="rb", bufsize=8192):
    from webdataset.gopen import Pipe
    return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141, 23])


wds.gopen_schemes.setdefault("s3", _gopen_s3)


# ---------------------------------------------------------------- exactly-once splitting

class Task(NamedTuple):
    """Read `url`, keeping the samples whose index in the shard is `res` modulo `mod`."""
    url: str
    mod: int = 1
    res: int = 0


def split_tasks(tasks: Sequence[Task], parts: int, part: int) -> List[Task]:
    """Part `part` of `parts` disjoint shares that together cover every sample of `tasks` once.

    The first floor(n/parts)*parts tasks are dealt out whole (task i to part i % parts).
    Each remaining task t is refined: part p keeps indices = t.res + t.mod*p (mod t.mod*parts).
    Those classes partition t's class {i = t.res (mod t.mod)}, so nothing is lost or doubled,
    and applying the function twice (ranks, then workers) keeps both properties.
    """
    if parts <= 1:
        return list(tasks)
    whole = len(tasks) // parts * parts
    mine = [t for i, t in enumerate(tasks[:whole]) if i % parts == part]
    mine += [Task(t.url, t.mod * parts, t.res + t.mod * part) for t in tasks[whole:]]
    return mine


class SkipCounter:
    """WebDataset error handler that warns, counts and continues.

    The count lives in shared memory, so DataLoader workers started by fork add to the
    parent's total; under spawn each worker counts only its own skips.
    """

    def __init__(self):
        self._shared = (multiprocessing.get_context("fork").Value("q", 0)
                        if "fork" in multiprocessing.get_all_start_methods() else None)
        self._local = 0

    @property
    def value(self) -> int:
        return self._shared.value if self._shared is not None else self._local

    def __call__(self, exn: BaseException) -> bool:
        if self._shared is not None:
            with self._shared.get_lock():
                self._shared.value += 1
        self._local += 1
        log.warning("skipping a corrupt sample (%d so far): %s", self.value, repr(exn)[:300])
        return True

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_shared"] = None  # a shared Value cannot be pickled into spawned workers
        return state


class _EvalShards(torch.utils.data.IterableDataset):
    """The raw samples of this rank's and this worker's share, in shard order."""

    def __init__(self, urls: List[str], world_size: int, rank: int, handler: Callable):
        super().__init__()
        self.urls, self.world_size, self.rank, self.handler = urls, world_size, rank, handler

    def tasks(self, worker: int = 0, num_workers: int = 1) -> List[Task]:
        mine = split_tasks([Task(u) for u in self.urls], self.world_size, self.rank)
        return split_tasks(mine, num_workers, worker)

    def __iter__(self):
        for task in self.tasks(*_worker()):
            samples = wds.tarfile_samples([dict(url=task.url)], handler=self.handler)
            for i, sample in enumerate(samples):
                if i % task.mod == task.res:  # before decoding, so indices agree across readers
                    yield sample


# ---------------------------------------------------------------- decoding and batching

class DecodeSample:
    """Raw tar sample -> {key, study_id, image, text, text_kind, meta}."""

    def __init__(self, preprocess: Optional[Callable], text_choice=None, train: bool = False,
                 seed: int = 0, rank: int = 0):
        self.preprocess = preprocess
        self.probs = normalise_choice(text_choice, train)
        self.train, self.seed, self.rank = train, seed, rank
        self._rng: Optional[random.Random] = None

    def _rng_for(self, key: str) -> random.Random:
        if not self.train:
            return random.Random(f"{self.seed}:{key}")  # evaluation: the same text every time
        if self._rng is None:  # created in the worker, so each worker draws its own stream
            self._rng = random.Random(f"{self.seed}:{self.rank}:{_worker()[0]}")
        return self._rng

    def __call__(self, sample: dict) -> dict:
        from open_clip_cxr.vision.io import load_image  # the vision package is heavy; import when used
        key = sample["__key__"]
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "txt" not in sample:
            raise ValueError(f"sample {key} lacks an image or a txt member ({sorted(sample)})")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        image = load_image(sample[ext], name=f"{key}.{ext}", mode="L")
        if self.preprocess is not None:
            image = self.preprocess(image)
        text, kind = choose_text(sample["txt"].decode("utf-8"), meta, self.probs, self._rng_for(key))
        return {"key": key, "study_id": meta.get("study_id", key), "image": image, "text": text,
                "text_kind": kind, "meta": meta}


class Collate:
    """Stack images and tokenize the batch's texts in one call (fast tokenizers batch well)."""

    def __init__(self, tokenizer: Optional[Callable], return_keys: bool = False):
        self.tokenizer, self.return_keys = tokenizer, return_keys

    def __call__(self, samples: List[dict]):
        images = torch.stack([s["image"] for s in samples])
        texts = [s["text"] for s in samples]
        tokens = self.tokenizer(texts) if self.tokenizer is not None else texts
        if self.return_keys:
            return images, tokens, [s["key"] for s in samples]
        return images, tokens


class _Shuffle:
    """Buffer shuffle whose generator is seeded per (seed, rank, worker, epoch), in the worker."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, -1

    def __call__(self, src: Iterator) -> Iterator:
        self.epoch += 1
        rng = random.Random(f"{self.seed}:{self.rank}:{_worker()[0]}:{self.epoch}")
        buf: list = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


def _worker_seed(rank: int) -> int:
    # distinct shard streams per rank and worker: that is what "split by node and worker" means here
    return rank * 100003 + _worker()[0]


# ---------------------------------------------------------------- public entry points

def make_loader(urls, *, preprocess, tokenizer, batch_size: int, train: bool, text_choice=None,
                num_workers: int = 0, shuffle_buffer: int = 1000, seed: int = 0,
                world_size: Optional[int] = None, rank: Optional[int] = None,
                epoch_samples: Optional[int] = None, return_keys: bool = False):
    """A `wds.WebLoader` yielding `(images, tokens)` (plus keys when `return_keys`).

    train: infinite resampled stream cut into epochs of `epoch_samples` samples over all
    ranks (default: the shards' count from their manifest); `loader.num_batches` is per rank.
    eval: each sample once over all ranks and workers; the last batch may be short.
    `text_choice`: {"report"|"impression"|"findings"|"variant": weight}; default 0.5/0.3/0.1/0.1
    for training and the full report for evaluation.
    """
    urls = expand_urls(urls)
    world_size, rank = resolve_world(world_size, rank)
    skipped = SkipCounter()
    decode = DecodeSample(preprocess, text_choice, train=train, seed=seed, rank=rank)
    collate = Collate(tokenizer, return_keys)
    if train:
        total = epoch_samples if epoch_samples is not None else count_samples(urls)
        if total is None:
            raise ValueError("epoch_samples is needed when the shards have no manifest.json next to them")
        shards = wds.ResampledShards(urls, seed=seed, deterministic=True,
                                     worker_seed=functools.partial(_worker_seed, rank))
        pipeline = wds.DataPipeline(shards, wds.tarfile_to_samples(handler=skipped),
                                    _Shuffle(shuffle_buffer, seed, rank) if shuffle_buffer > 1 else None,
                                    wds.map(decode, handler=skipped),
                                    wds.batched(batch_size, collation_fn=collate, partial=False))
        workers = max(1, num_workers)
        per_worker = math.ceil(math.ceil(total / (batch_size * world_size)) / workers)
        pipeline = pipeline.with_epoch(nbatches=per_worker)
        num_batches = per_worker * workers
    else:
        pipeline = wds.DataPipeline(_EvalShards(urls, world_size, rank, skipped),
                                    wds.map(decode, handler=skipped),
                                    wds.batched(batch_size, collation_fn=collate, partial=True))
        total, num_batches = count_samples(urls), None
    # pinned host memory: a trainer's non-blocking copies to the GPU then overlap with compute
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                           persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    loader.num_batches = num_batches
    loader.num_samples = num_batches * batch_size * world_size if train else total
    loader.skipped = skipped
    loader.world_size, loader.rank = world_size, rank
    return loader


class SampleSource:
    """This rank's share of every sample once, unbatched: `(key, study_id, image, text, meta)`.

    For retrieval evaluation, which groups images by `study_id` and scores all pairs itself.
    """

    def __init__(self, urls, *, preprocess=None, text_choice=None, world_size: Optional[int] = None,
                 rank: Optional[int] = None, num_workers: int = 0, seed: int = 0):
        self.urls = expand_urls(urls)
        self.world_size, self.rank = resolve_world(world_size, rank)
        self.skipped = SkipCounter()
        self.num_workers = num_workers
        decode = DecodeSample(preprocess, text_choice, train=False, seed=seed, rank=self.rank)
        self.pipeline = wds.DataPipeline(_EvalShards(self.urls, self.world_size, self.rank, self.skipped),
                                         wds.map(decode, handler=self.skipped), wds.map(_as_tuple))

    def __iter__(self):
        if self.num_workers <= 0:
            return iter(self.pipeline)
        return iter(torch.utils.data.DataLoader(self.pipeline, batch_size=None, num_workers=self.num_workers))


def _as_tuple(s: dict):
    return s["key"], s["study_id"], s["image"], s["text"], s["meta"]
