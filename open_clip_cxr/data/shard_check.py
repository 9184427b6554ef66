"""Check evaluation shards before reading them, so that no metric is computed on a silent subset.

`check_shards(patterns)` expands brace (`test-{000000..000004}.tar`) and glob (`test-*.tar`)
patterns and checks every local shard: it exists and is a file; its tar headers read to the
end without running past the file (a truncated or corrupt tar fails); and, when a
`manifest.json` written by `open-clip-cxr shards` lies beside it, its sha256 and sample count
agree with the manifest. Problems are errors (`ShardCheckError`, a user error: exit 2) unless
`allow_partial`, which drops the bad shards and counts them (and their samples, where the
manifest knows them) as warnings. Remote urls (`pipe:`, http(s), s3) are passed through unchecked.
"""
from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from open_clip_cxr.data.manifest import file_sha256, load_manifest
from open_clip_cxr.errors import UsageError


class ShardCheckError(UsageError):
    """A shard to be evaluated is missing, damaged, or disagrees with its manifest."""


@dataclass
class ShardCheck:
    urls: List[str]                                   # the shards to read (all of them, or the good ones)
    problems: List[Dict[str, str]] = field(default_factory=list)   # [{"shard", "problem"}]
    expected_samples: Optional[int] = None            # samples in `urls` per their manifests (None: unknown)
    lost_samples: Optional[int] = 0                   # samples in dropped shards (None: unknown)

    def as_dict(self) -> dict:
        return {"shards": len(self.urls), "problems": self.problems, "expected_samples": self.expected_samples,
                "lost_samples": self.lost_samples}


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def expand_patterns(urls: Union[str, Sequence[str]]) -> List[str]:
    """Brace patterns (several joined by '::') and globs -> shard urls; a glob that matches nothing
    stays as it is, so that the check reports it as missing."""
    from webdataset.shardlists import expand_urls as _expand
    items = [urls] if isinstance(urls, str) else list(urls)
    out: List[str] = []
    for item in items:
        for url in _expand(str(item)):
            local = url[5:] if url.startswith("file:") else url
            if _is_local(url) and any(c in local for c in "*?["):
                out.extend(sorted(glob.glob(local)) or [url])
            else:
                out.append(url)
    if not out:
        raise UsageError("no shard urls given; give a brace pattern 'DIR/test-{000000..000009}.tar' or a glob "
                         "'DIR/test-*.tar'")
    return out


def scan_tar(path: Path) -> int:
    """Samples (distinct keys) in a tar; raises ValueError if the tar is truncated or corrupt."""
    size = path.stat().st_size
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.offset_data + m.size > size:
                    raise ValueError(f"truncated: member {m.name} runs past the end of the file")
                if m.isfile():
                    base = os.path.basename(m.name)
                    keys.add(os.path.join(os.path.dirname(m.name), base.split(".", 1)[0]))
    except tarfile.TarError as e:
        raise ValueError(f"not a readable tar ({e})") from None
    return len(keys)


def check_shards(urls, allow_partial: bool = False, verify: str = "sha256") -> ShardCheck:
    expanded = expand_patterns(urls)
    good, problems = [], []
    expected: Optional[int] = 0
    lost: Optional[int] = 0
    manifests: Dict[Path, Optional[dict]] = {}
    for url in expanded:
        if not _is_local(url):
            good.append(url)
            expected = None
            continue
        path = Path(url[5:] if url.startswith("file:") else url)
        if path.parent not in manifests:
            try:
                manifests[path.parent] = load_manifest(path.parent)
            except (OSError, ValueError):
                manifests[path.parent] = None
        entry = ((manifests[path.parent] or {}).get("shards") or {}).get(path.name)
        problem = None
        if not path.exists():
            problem = "missing" if not any(c in url for c in "*?[") else "pattern matches no file"
        elif not path.is_file():
            problem = "not a file"
        else:
            try:
                count = scan_tar(path)
            except (OSError, ValueError) as e:
                problem = str(e)
            else:
                if entry is not None:
                    if entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
                        problem = f"size {path.stat().st_size} bytes, manifest.json says {entry['bytes']}"
                    elif verify == "sha256" and entry.get("sha256") and file_sha256(path) != entry["sha256"]:
                        problem = "sha256 differs from manifest.json"
                    elif entry.get("count") is not None and count != entry["count"]:
                        problem = f"{count} samples, manifest.json says {entry['count']}"
        if problem is None:
            good.append(url)
            if expected is not None:
                expected = None if entry is None else expected + int(entry["count"])
            continue
        problems.append({"shard": url, "problem": problem})
        if lost is not None:
            lost = None if entry is None else lost + int(entry["count"])
    if problems and not allow_partial:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ShardCheckError(f"shard {first['shard']}: {first['problem']}{more}; fix or rewrite it with "
                              "`open-clip-cxr shards` (a rerun redoes damaged shards), or pass --allow-partial "
                              "to evaluate the rest and count what is left out")
    if problems:
        import logging
        for p in problems:
            logging.getLogger(__name__).warning("--allow-partial: leaving out %s (%s)", p["shard"], p["problem"])
    if not good:
        raise ShardCheckError("no readable shard left to evaluate; check --shards")
    return ShardCheck(good, problems, expected, lost)
