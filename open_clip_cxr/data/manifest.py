"""`manifest.json`: what a shard folder holds, and how a rerun knows which shards are whole.

Each shard entry records the slice of the split's (deterministically ordered) samples it
covers, so a rerun can rebuild exactly that shard, and its size and sha256, so a rerun can
tell a complete shard from a truncated or missing one.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

MANIFEST_NAME = "manifest.json"
FORMAT = "open_clip_cxr-shards/1"
VERIFY_MODES = ("sha256", "size")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def brace_pattern(split: str, n_shards: int) -> str:
    """The WebDataset url pattern covering a split's shards, e.g. `train-{000000..000009}.tar`."""
    if n_shards <= 1:
        return shard_name(split, 0)
    return f"{split}-{{{0:06d}..{n_shards - 1:06d}}}.tar"


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(out_dir) -> Optional[dict]:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_manifest(out_dir, manifest: dict) -> None:
    """Write atomically: a crash leaves either the old or the new manifest, never half of one."""
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_is_complete(out_dir, name: str, entry: dict, verify: str = "sha256") -> bool:
    """True when the shard file exists and matches the size (and checksum) the manifest recorded."""
    path = Path(out_dir) / name
    if not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return verify == "size" or file_sha256(path) == entry.get("sha256")


def fingerprint(config: dict, keys_by_split: Dict[str, List[str]]) -> str:
    """Identifies what a folder's shards were made from; a rerun only reuses shards with the same one."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for split in sorted(keys_by_split):
        h.update(f"\n[{split}]\n".encode())
        h.update("\n".join(keys_by_split[split]).encode())
    return h.hexdigest()


def summarise(manifest: dict, plan_skips: List[dict]) -> None:
    """Fill in the per-split totals and the skip list from the shard entries (in place)."""
    splits: Dict[str, dict] = {}
    skipped = list(plan_skips)
    for name in sorted(manifest["shards"]):
        e = manifest["shards"][name]
        s = splits.setdefault(e["split"], {"samples": 0, "shards": 0, "bytes": 0, "skipped": 0})
        s["samples"] += e["count"]
        s["shards"] += 1
        s["bytes"] += e["bytes"]
        s["skipped"] += len(e["skipped"])
        skipped.extend(dict(sk, split=e["split"], shard=name) for sk in e["skipped"])
    for split, s in splits.items():
        s["urls"] = brace_pattern(split, s["shards"])
    manifest["splits"] = splits
    manifest["skipped"] = {"total": len(skipped),
                           "by_reason": dict(sorted(Counter(sk["reason"] for sk in skipped).items())),
                           "samples": skipped}


def shard_urls(out_dir, split: str) -> List[str]:
    """Paths of a split's shards, read from the manifest (in index order)."""
    manifest = load_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir}")
    entries = sorted((e["index"], n) for n, e in manifest["shards"].items() if e["split"] == split)
    return [str(Path(out_dir) / n) for _, n in entries]


def count_samples(urls: List[str]) -> Optional[int]:
    """Samples in the given local shard files, from the manifests next to them; None if unknown."""
    total = 0
    cache: Dict[Path, Optional[dict]] = {}
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            return None
        path = Path(url[5:] if url.startswith("file:") else url)
        if path.parent not in cache:
            cache[path.parent] = load_manifest(path.parent)
        entry = (cache[path.parent] or {}).get("shards", {}).get(path.name)
        if entry is None:
            return None
        total += entry["count"]
    return total
