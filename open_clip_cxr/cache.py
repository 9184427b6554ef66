"""Where converted weights live: `$OPEN_CLIP_CXR_CACHE`, default `~/.cache/open_clip_cxr` (never in git)."""
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("OPEN_CLIP_CXR_CACHE", Path.home() / ".cache" / "open_clip_cxr"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
