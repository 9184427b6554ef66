"""`open-clip-cxr push`, registered through the entry-point group `open_clip_cxr.commands`
(pyproject.toml). Kept light: `--help` loads this file only."""
from open_clip_cxr.commands import Command

PUSH = Command("open_clip_cxr_hub.push", "upload an exported folder to the Hugging Face Hub", 70)
