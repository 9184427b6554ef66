"""Check a stage's training (and validation) shards before any work starts.

    check_training_data(recipe, "clip")    # data.train and data.val; "text": data.shards

Refused (a `PreflightError`, a user error: one line, exit 2), before the accelerator, the run
folder or a model exists:
- no training shards named (`data.train: null`);
- a pattern that matches no file, or names a file that does not exist, or one that is not a
  readable tar, or disagrees with the `manifest.json` beside it (`data/shard_check.py`; sizes and
  sample counts only: the sha256 of hundreds of GB would delay every start);
- shards that hold no sample at all (today the loader then hangs, or spins on warnings);
- the same for `data.val`, which would otherwise fail at the end of the first epoch.
Remote urls (`pipe:`, http(s), s3) pass unchecked, as in `shard_check`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from open_clip_cxr.errors import UsageError


class PreflightError(UsageError):
    """The data a training run names is missing, damaged or empty."""


def _samples(urls) -> Optional[int]:
    """Samples in the local shards (stops at the first non-empty one: only emptiness matters);
    None when only remote shards are named."""
    from open_clip_cxr.data.shard_check import _is_local, scan_tar
    local = [u for u in urls if _is_local(u)]
    if not local:
        return None
    for url in local:
        n = scan_tar(Path(url[5:] if url.startswith("file:") else url))
        if n:
            return n
    return 0


def check_shards(key: str, pattern, fix: str) -> int:
    """Check the shards `pattern` (the recipe's `key`) names; returns how many there are."""
    from open_clip_cxr.data.shard_check import ShardCheckError
    from open_clip_cxr.data.shard_check import check_shards as _check
    try:
        check = _check(pattern, allow_partial=False, verify="size")
    except ShardCheckError as e:
        text = str(e).split("; fix or rewrite it", 1)[0]
        raise PreflightError(f"`{key}`: {text}; {fix}") from None
    except UsageError as e:
        raise PreflightError(f"`{key}`: {e}") from None
    if check.expected_samples == 0 or (check.expected_samples is None and _samples(check.urls) == 0):
        raise PreflightError(f"`{key}`: the {len(check.urls)} shard(s) of {pattern!r} hold no sample; "
                             "rewrite them with `open-clip-cxr shards`")
    return len(check.urls)


def check_training_data(recipe: dict, stage: str) -> None:
    """Refuse a run whose shards cannot be trained on; see the module docstring."""
    data = recipe.get("data") or {}
    if stage == "clip":
        if not data.get("train"):
            raise PreflightError("the recipe names no training shards: "
                                 "--set data.train=DIR/train-{000000..000009}.tar")
        check_shards("data.train", data["train"], "check --set data.train=DIR/train-{000000..000009}.tar")
        if data.get("val"):
            check_shards("data.val", data["val"], "check data.val, or --set data.val=null to train without "
                                                  "validation")
    elif stage == "text":
        if data.get("shards"):
            check_shards("data.shards", data["shards"], "check --set data.shards=DIR/train-{000000..000009}.tar")
        elif data.get("path") and not Path(data["path"]).exists():
            raise PreflightError(f"`data.path`: {data['path']} does not exist; give the reports' file")
    else:
        raise ValueError(f"stage {stage!r}: 'text' or 'clip'")
