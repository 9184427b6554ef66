"""Where converted weights live: `$OPEN_CLIP_CXR_CACHE`, default `~/.cache/open_clip_cxr` (never in git)."""
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("OPEN_CLIP_CXR_CACHE", Path.home() / ".cache" / "open_clip_cxr"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def process_tmp(path: Path) -> Path:
    """A temporary name next to `path` that no other process uses.

    Why: two jobs started together (two seeds, a training run and an eval) both fill the shared
    cache; with one fixed `NAME.tmp` the second job's rename finds the first job's file already
    moved and dies. Each writer renames its own file; the last rename wins with identical bytes.
    """
    return path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
