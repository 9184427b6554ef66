"""Write `Sample`s into WebDataset tar shards, one folder per run, resumably.

Layout: `OUT/{split}-{index:06d}.tar` and `OUT/manifest.json`. Each sample is three tar
members sharing a key: `KEY.png|jpg` (grayscale, longest side <= max_side), `KEY.txt` (the
report) and `KEY.json` (ids, view, split, sections, labels, variants).

Why it is safe to interrupt:
- samples are ordered deterministically (a seeded hash of the study, then the key), and the
  manifest records the slice of that order each shard covers, so a rerun rebuilds any
  missing or damaged shard byte for byte and continues where the last complete one ended;
- a shard is written as `NAME.tar.tmp` and renamed only when whole, and the manifest is
  rewritten atomically after each shard, so nothing already written is ever lost;
- a bad input (unreadable image, missing file, empty or non-UTF-8 report, duplicate key)
  skips that one sample and is listed in the manifest with its reason.

Images are decoded and re-encoded in a multiprocessing pool; the parent writes the tar
files in order, so the shards do not depend on the number of workers.
"""
from __future__ import annotations

import functools
import hashlib
import io
import multiprocessing
import os
import re
import tarfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

from open_clip_cxr.data.encode import Encoded, EncodeOptions, encode_sample
from open_clip_cxr.data.manifest import (FORMAT, VERIFY_MODES, file_sha256, fingerprint, load_manifest,
                                         save_manifest, shard_is_complete, shard_name, summarise)
from open_clip_cxr.data.sources import DUPLICATE_KEY, Record, Sample, Skipped

DEFAULT_SAMPLES_PER_SHARD = 1000
DEFAULT_MAX_SHARD_BYTES = 1 << 30
_TAR_END = 10240  # end-of-archive blocks plus record padding, added when a tar is closed


class ShardWriterError(RuntimeError):
    """The output folder cannot be written as asked (e.g. it holds shards of another configuration)."""


@dataclass(frozen=True)
class ShardLimits:
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES

    def __post_init__(self):
        if self.samples_per_shard < 1 or self.max_shard_bytes < 1:
            raise ValueError("samples_per_shard and max_shard_bytes must be positive")


def _skip_dict(key: str, reason: str, detail: str = "") -> dict:
    return {"key": key, "reason": reason, "detail": detail}


def _member_bytes(name: str, size: int) -> int:
    """What one member adds to a GNU tar: header, data padded to 512, a long-name block if needed."""
    longname = 0 if len(name) < 100 else 512 + ((len(name) + 1 + 511) // 512) * 512
    return longname + 512 + ((size + 511) // 512) * 512


class _OpenShard:
    """A shard being written to `NAME.tar.tmp`, with fixed, reproducible tar headers."""

    def __init__(self, out_dir: Path, split: str, index: int, start: int):
        self.out_dir, self.split, self.index, self.start = out_dir, split, index, start
        self.name = shard_name(split, index)
        self.tmp = out_dir / (self.name + ".tmp")
        self.fh = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.fh, mode="w", format=tarfile.GNU_FORMAT)
        self.count = 0
        self.skipped: List[dict] = []

    @property
    def size(self) -> int:
        return self.tar.offset

    def add(self, enc: Encoded) -> None:
        for ext, data in enc.members:
            info = tarfile.TarInfo(f"{enc.key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # mtime 0: reruns give identical bytes
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def finish(self, end: int) -> dict:
        self.tar.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        entry = {"split": self.split, "index": self.index, "start": self.start, "end": end,
                 "count": self.count, "bytes": self.tmp.stat().st_size, "sha256": file_sha256(self.tmp),
                 "skipped": self.skipped}
        os.replace(self.tmp, self.out_dir / self.name)
        return entry

    def abandon(self) -> None:
        try:
            self.tar.close()
        finally:
            self.fh.close()


def _study_order(sample: Sample, seed: int) -> str:
    # a seeded hash of the study: mixes patients across shards, keeps a study's images together
    return hashlib.sha1(f"{seed}:{sample.source}:{sample.study_id}".encode()).hexdigest()


def plan_samples(records: Iterable[Record], seed: int = 0, limit: Optional[int] = None):
    """Order, de-duplicate and split the records: ({split: [Sample]}, [skip dicts])."""
    skips: List[dict] = []
    samples: List[Sample] = []
    for r in records:
        if isinstance(r, Skipped):
            skips.append(_skip_dict(r.key, r.reason, r.detail))
        else:
            samples.append(r)
    samples.sort(key=lambda s: (_study_order(s, seed), s.key, s.image_path))
    seen = set()
    unique: List[Sample] = []
    for s in samples:
        if s.key in seen:
            skips.append(_skip_dict(s.key, DUPLICATE_KEY, s.image_path))
            continue
        seen.add(s.key)
        unique.append(s)
    if limit is not None:
        unique = unique[:limit]
    by_split: Dict[str, List[Sample]] = defaultdict(list)
    for s in unique:
        by_split[s.split].append(s)
    return dict(sorted(by_split.items())), skips


@dataclass
class _Segment:
    """Samples `[start, end)` of a split to (re)write from shard `index` on; end None: to the split's end,
    cut into shards by the limits."""
    split: str
    index: int
    start: int
    end: Optional[int]


def _plan_segments(out_dir: Path, by_split, old: Optional[dict], verify: str, kept: Dict[str, dict]):
    """Reuse the shards the old manifest vouches for; return what is left to write."""
    segments: List[_Segment] = []
    for split, samples in by_split.items():
        entries = sorted((e for e in (old or {}).get("shards", {}).values() if e["split"] == split),
                         key=lambda e: e["index"])
        pos = index = 0
        for e in entries:
            if e["index"] != index or e["start"] != pos:
                break  # not contiguous: trust nothing after this point
            name = shard_name(split, index)
            if shard_is_complete(out_dir, name, e, verify):
                kept[name] = e
            else:
                segments.append(_Segment(split, index, e["start"], e["end"]))
            pos, index = e["end"], index + 1
        if pos < len(samples):
            segments.append(_Segment(split, index, pos, None))
    return segments


def _encode_all(jobs: List[Sample], opts: EncodeOptions, workers: int) -> Iterator[Encoded]:
    fn = functools.partial(encode_sample, opts=opts)
    if workers <= 1 or len(jobs) < 2:
        yield from map(fn, jobs)
        return
    # fork: workers start instantly and inherit the imported modules; they only run PIL code
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    chunk = max(1, min(16, len(jobs) // (workers * 4)))
    pool = multiprocessing.get_context(method).Pool(workers)
    try:
        yield from pool.imap(fn, jobs, chunksize=chunk)  # ordered: shard contents independent of timing
    finally:
        pool.terminate()
        pool.join()


def _remove_outputs(out_dir: Path, manifest: Optional[dict]) -> None:
    """Delete what an earlier run wrote: its listed shards and any file named like one of ours."""
    ours = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
    for path in out_dir.iterdir():
        if path.name in (manifest or {}).get("shards", {}) or ours.match(path.name):
            path.unlink()
    (out_dir / "manifest.json").unlink(missing_ok=True)


def write_shards(records: Iterable[Record], out_dir, *, options: EncodeOptions = EncodeOptions(),
                 limits: ShardLimits = ShardLimits(), workers: int = 1, limit: Optional[int] = None,
                 overwrite: bool = False, verify: str = "sha256", progress: bool = True,
                 on_shard_done: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Write the records' samples as shards into `out_dir`; return the manifest (also saved there).

    A rerun with the same inputs and options keeps the complete shards and redoes the rest;
    with different ones it refuses unless `overwrite` (which deletes the old shards first).
    `on_shard_done(name, entry)` runs after each shard and its manifest entry are on disk.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}")
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_split, plan_skips = plan_samples(_progress(None, progress, records, "reading index", "sample"),
                                        seed=options.seed, limit=limit)
    if not by_split:
        raise ShardWriterError(f"no usable samples found ({len(plan_skips)} skipped"
                               + (f", e.g. {plan_skips[0]['reason']}: {plan_skips[0]['detail']}" if plan_skips else "")
                               + "); check --root / --reports / --table")
    config = {"format": FORMAT, "encode": asdict(options), "limits": asdict(limits), "limit": limit}
    fp = fingerprint(config, {k: [s.key for s in v] for k, v in by_split.items()})
    old = load_manifest(out_dir)
    if old is not None and (overwrite or old.get("fingerprint") != fp):
        if not overwrite:
            raise ShardWriterError(
                f"{out_dir} holds shards made from other inputs or options; "
                "pass --overwrite to replace them, or choose another --out")
        _remove_outputs(out_dir, old)
        old = None
    for tmp in out_dir.glob("*.tar.tmp"):  # leftovers of an interrupted run; always rewritten
        tmp.unlink()

    kept: Dict[str, dict] = {}
    segments = _plan_segments(out_dir, by_split, old, verify, kept)
    manifest = {"format": FORMAT, "fingerprint": fp, "config": config, "shards": dict(kept), "complete": False}
    summarise(manifest, plan_skips)
    save_manifest(out_dir, manifest)

    jobs = [s for seg in segments for s in by_split[seg.split][seg.start:seg.end]]
    written: List[str] = []
    bar = _progress(len(jobs), progress)
    bar.set_postfix(skipped=len(plan_skips), refresh=False)
    skipped_now = 0

    def done(entry: dict) -> None:
        name = shard_name(entry["split"], entry["index"])
        manifest["shards"][name] = entry
        summarise(manifest, plan_skips + unwritten)
        save_manifest(out_dir, manifest)
        written.append(name)
        if on_shard_done is not None:
            on_shard_done(name, entry)

    unwritten: List[dict] = []  # skips of splits that got no shard at all
    results = _encode_all(jobs, options, workers)
    shard: Optional[_OpenShard] = None
    try:
        for seg in segments:
            n = len(by_split[seg.split])
            end = n if seg.end is None else seg.end
            index, start = seg.index, seg.start
            pending: List[dict] = []  # skips seen before this segment's first shard is open
            for pos in range(seg.start, end):
                enc = next(results)
                bar.update(1)
                if enc.members is None:
                    skipped_now += 1
                    bar.set_postfix(skipped=len(plan_skips) + skipped_now, refresh=False)
                    (shard.skipped if shard is not None else pending).append(
                        _skip_dict(enc.key, enc.reason, enc.detail))
                    continue
                if seg.end is None and shard is not None and shard.count > 0 and _full(shard, enc, limits):
                    done(shard.finish(end=pos))
                    shard, index, start = None, index + 1, pos
                if shard is None:
                    shard = _OpenShard(out_dir, seg.split, index, start)
                    shard.skipped.extend(pending)
                    pending = []
                shard.add(enc)
            if shard is None and pending:
                prev = manifest["shards"].get(shard_name(seg.split, index - 1)) if index > 0 else None
                if prev is not None and seg.end is None:
                    # only skips left at the split's end: widen the last shard's slice (its bytes don't change)
                    prev["end"] = end
                    prev["skipped"] = prev["skipped"] + pending
                    summarise(manifest, plan_skips + unwritten)
                    save_manifest(out_dir, manifest)
                    continue
                if seg.end is None:
                    # nothing of this split could be written: no empty shard, but its skips are counted
                    unwritten.extend(dict(sk, split=seg.split) for sk in pending)
                    summarise(manifest, plan_skips + unwritten)
                    save_manifest(out_dir, manifest)
                    continue
                shard = _OpenShard(out_dir, seg.split, index, start)  # a rebuilt slice keeps its place
                shard.skipped.extend(pending)
            if shard is not None:
                done(shard.finish(end=end))
                shard = None
    finally:
        if shard is not None:
            shard.abandon()
        results.close()
        bar.close()

    summarise(manifest, plan_skips + unwritten)
    if not manifest["shards"]:
        save_manifest(out_dir, manifest)  # stays "complete": false, with every skip listed
        sk = manifest["skipped"]
        reasons = ", ".join(f"{r}: {n}" for r, n in sk["by_reason"].items())
        example = sk["samples"][0] if sk["samples"] else None
        raise ShardWriterError(
            f"wrote no sample: all {sk['total']} skipped ({reasons}"
            + (f"; e.g. {example['reason']} {example['detail'][:160]}" if example else "")
            + f"); check --root / --reports / --table (skips listed in {out_dir / 'manifest.json'})")
    manifest["complete"] = True
    save_manifest(out_dir, manifest)
    seconds = time.time() - t0
    manifest["run"] = {"written": written, "reused": sorted(kept), "processed": len(jobs),
                       "skipped_images": skipped_now, "seconds": round(seconds, 3)}
    return manifest


def _full(shard: _OpenShard, enc: Encoded, limits: ShardLimits) -> bool:
    if shard.count >= limits.samples_per_shard:
        return True
    extra = sum(_member_bytes(f"{enc.key}.{ext}", len(d)) for ext, d in enc.members)
    return shard.size + extra + _TAR_END > limits.max_shard_bytes


def _progress(total: Optional[int], enabled: bool, iterable=None, desc: str = "shards", unit: str = "img"):
    """tqdm bar: rate (samples/s) and, via its postfix, the skipped count."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, unit=unit, desc=desc, disable=not enabled or total == 0,
                dynamic_ncols=True, smoothing=0.1, leave=desc == "shards")


def format_summary(manifest: dict, out_dir=None, max_examples: int = 5) -> str:
    """A human-readable account of a run: what was written, reused and skipped, and why."""
    lines = []
    run = manifest.get("run", {})
    if out_dir is not None:
        lines.append(f"shards in {out_dir}")
    if run:
        rate = run["processed"] / run["seconds"] if run["seconds"] else 0.0
        lines.append(f"this run: wrote {len(run['written'])} shard(s), kept {len(run['reused'])} complete one(s), "
                     f"processed {run['processed']} image(s) in {run['seconds']:.1f}s ({rate:.1f} img/s)")
    for split, s in manifest.get("splits", {}).items():
        lines.append(f"  {split:<9} {s['samples']:>8} samples in {s['shards']:>4} shard(s), "
                     f"{s['bytes'] / 1e6:9.1f} MB   {s['urls']}")
    sk = manifest.get("skipped", {})
    if sk.get("total"):
        reasons = ", ".join(f"{r}: {n}" for r, n in sk["by_reason"].items())
        lines.append(f"skipped {sk['total']} sample(s) ({reasons}); full list in manifest.json")
        for item in sk["samples"][:max_examples]:
            lines.append(f"    {item['reason']:<17} {item['key']}  {item['detail'][:120]}")
    else:
        lines.append("skipped nothing")
    return "\n".join(lines)
