"""The training wing's `open-clip-cxr` subcommands, registered through the entry-point group
`open_clip_cxr.commands` (pyproject.toml). Kept light: `--help` loads this file, not the stages."""
from open_clip_cxr.commands import Command

TRAIN_TEXT = Command("open_clip_cxr_train.text_cli", "stage 1: adapt the text tower (MNTP, then supervised contrastive)", 20)
TRAIN_CLIP = Command("open_clip_cxr_train.clip_cli", "stage 2: contrastive image-report training (LoRA text tower)", 30)
DEMO = Command("open_clip_cxr_train.demo", "the whole pipeline on real offline assets, on the CPU", 110)
