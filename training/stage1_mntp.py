"""Stage 1, step 1: masked next-token prediction (`training/mntp.py`) with LoRA, merged when done.

A batch maker (`MNTPBatches`: reports -> masked ids and labels, a pure function of the
micro-batch index), a step (`mntp_step`: the loss of `MNTPModel`), and `mntp_phase`, which
hands both to the shared loop (`training/loop.py` through `stage1_run.run_stage`). A finished
MNTP leaves `work/mntp/adapter.pt`; a rerun reloads it instead of training again.
"""
from functools import partial

import torch

from open_clip_cxr.reports.variants import base_text
from open_clip_cxr_train.mntp import LORA_TARGETS, mask_tokens, resolve_mask_token_id, special_token_ids
from open_clip_cxr_train.speedups import FrozenCast
from open_clip_cxr_train.stage1_data import StepData
from open_clip_cxr_train.stage1_run import run_stage
from open_clip_cxr_train.stage1_model import MNTPModel, mntp_flops_per_token, set_lora, trainable


class MNTPBatches:
    """`batches(micro)` -> (masked ids, attention mask, labels) of this process's micro-batch."""

    def __init__(self, run, mcfg: dict):
        tokenizer, tower = run.tokenizer, run.tower
        self.tokenizer, self.pad, self.max_length = tokenizer, run.pad, run.max_length
        self.seed, self.world, self.rank = run.seed, run.world, run.rank
        self.mask_id = resolve_mask_token_id(tokenizer, mcfg.get("mask_token", "_"))
        self.specials = special_token_ids(tokenizer, [tower.config.instruction_separator_id, run.pad])
        self.prob = float(mcfg.get("mask_prob", 0.2))
        self.texts = [base_text(r) for r in run.reports]
        self.data = StepData(len(self.texts), int(mcfg["batch_size"]), run.seed, run.world, run.rank)

    def __call__(self, micro: int):
        gen = torch.Generator().manual_seed(self.seed * 7919 + micro * self.world + self.rank)   # resumable
        ids = self.tokenizer([self.texts[i] for _, i in self.data(micro)], context_length=self.max_length)
        mask = ids != self.pad
        masked, labels = mask_tokens(ids, mask, self.mask_id, self.specials, self.prob, gen)
        return masked, mask, labels


def mntp_step(module, batch, device):
    """(loss, samples, real tokens) of one micro-batch."""
    ids, mask, labels = (t.to(device) for t in batch)
    return module(ids, mask, labels), ids.shape[0], int(mask.sum())


def mntp_phase(run) -> int:
    """MNTP for `mntp.steps` steps (0: skipped), merged into the base weights; returns the steps."""
    mcfg = run.recipe.get("mntp") or {}
    m_steps = int(mcfg.get("steps", 0))
    if m_steps <= 0:
        return 0
    tower, acc = run.tower, run.accelerator
    adapter_path = run.out / "work" / "mntp" / "adapter.pt"
    torch.manual_seed(run.seed)
    set_lora(tower, {**mcfg.get("lora", {}), "target_modules": mcfg.get("lora", {}).get("target_modules", LORA_TARGETS)})
    if adapter_path.exists():
        from open_clip_cxr.text.lora import load_adapter_state_dict
        load_adapter_state_dict(tower.llm, torch.load(adapter_path, map_location="cpu", weights_only=True))
        run.state.step = max(run.state.step, m_steps)
        acc.print(f"MNTP: reusing {adapter_path}")
    else:
        batches = MNTPBatches(run, mcfg)
        cast = FrozenCast(tower, run.frozen_dtype)
        groups = [{"params": trainable(tower), "lr": float(mcfg.get("lr", 2e-4))}]
        run_stage(run, "mntp", MNTPModel(tower, int(run.recipe["train"].get("max_tokens", 4096))), groups, mcfg,
                  0, batches, partial(mntp_step, device=acc.device), mntp_flops_per_token(tower, batches.prob))
        cast.restore()
        if acc.is_main_process:
            from open_clip_cxr.text.lora import adapter_state_dict
            torch.save(adapter_state_dict(tower.llm), adapter_path)
    set_lora(tower, None)   # merge MNTP into the base weights
    return m_steps
