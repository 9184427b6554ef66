"""`open-clip-cxr convert` and `export`, registered through the entry-point group
`open_clip_cxr.commands` (pyproject.toml). Kept light: `--help` loads this file only."""
from open_clip_cxr.commands import Command

CONVERT = Command("open_clip_cxr_convert.cli", "import the authors' releases; merge LoRA", 50)
EXPORT = Command("open_clip_cxr_convert.export", "write an OpenCLIP Hub folder (config, safetensors, tokenizer, card)", 60)
