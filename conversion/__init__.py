"""Checkpoints in and out: the authors' releases -> our format, LoRA merge, OpenCLIP Hub folders."""
