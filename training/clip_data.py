"""The CLIP stage's data: each epoch's micro-batches (seeded, resumable) and validation recall."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from open_clip_cxr_train.checkpoints import data_seed


# ---------------------------------------------------------------- data

@contextlib.contextmanager
def preserved_rng():
    """Run something (skipping batches) without moving the RNGs the training loop draws from."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0]); np.random.set_state(states[1]); torch.set_rng_state(states[2])


class SeededAugment:
    """The train transform, its random crops drawn from a stream of its own: the n-th image of
    a loader (per worker) is augmented with RNGs seeded from (seed, rank, worker, n), and the
    global RNGs are left untouched. The data then depends only on (seed, epoch, position),
    not on what the model drew from the RNGs in between - what an exact resume needs."""

    def __init__(self, transform, seed: int, rank: int = 0):
        self.transform, self.seed, self.rank, self.count = transform, seed, rank, 0

    def __call__(self, image):
        info = torch.utils.data.get_worker_info()
        s = hash((self.seed, self.rank, info.id if info else 0, self.count)) % (2 ** 31)
        self.count += 1
        with preserved_rng():
            random.seed(s)
            np.random.seed(s)
            torch.default_generator.manual_seed(s)   # the CPU generator only (CUDA's is the model's)
            return self.transform(image)


def train_loader(recipe, preprocess, tokenizer, accelerator, seed: int, cached: bool):
    """This process's share of an epoch (make_loader splits by rank itself: never `prepare()` it)."""
    from open_clip_cxr.data.loader import make_loader
    d = recipe["data"]
    preprocess = SeededAugment(preprocess, seed, accelerator.process_index)
    return make_loader(d["train"], preprocess=preprocess, tokenizer=None if cached else tokenizer,
                       batch_size=d["batch_size"], train=True, text_choice=d["text_choice"],
                       num_workers=d["num_workers"], shuffle_buffer=d["shuffle_buffer"], seed=seed,
                       world_size=accelerator.num_processes, rank=accelerator.process_index,
                       epoch_samples=d["epoch_samples"], return_keys=True)


def epoch_batches(recipe, preprocess, tokenizer, accelerator, epoch: int, done_micro: int, cached: bool):
    """Iterator over this process's micro-batches of `epoch`, after the `done_micro` already trained.

    Each epoch is a fresh stream seeded from (seed, epoch). On resume mid-epoch, `data.resume`
    picks how the position is restored: "skip" replays the epoch's stream and drops the
    batches already trained on (exact; costs their decoding), "reseed" starts a new stream
    seeded from (seed, epoch, step) (no replay, no cost; the default for large WebDatasets)."""
    skip, seed = 0, data_seed(recipe["seed"], epoch, 0)
    if done_micro and recipe["data"]["resume"] == "skip":
        skip = done_micro
    elif done_micro:
        seed = data_seed(recipe["seed"], epoch, done_micro)
    loader = train_loader(recipe, preprocess, tokenizer, accelerator, seed, cached)
    if not skip:
        return iter(loader)
    # Opening the loader (DataLoader draws a base seed) and the skipped batches' augmentations
    # must not move the RNGs that the checkpoint restored: the next batch then matches exactly.
    with preserved_rng():
        it = iter(loader)
        for _ in range(skip):
            next(it)
    return it


# ---------------------------------------------------------------- validation

@torch.no_grad()
def validate(accelerator, model, preprocess, tokenizer, urls, batch_size: int) -> dict:
    """Study-level image->report and report->image R@1/5/10, on the main process."""
    from open_clip_cxr.data.loader import SampleSource
    from open_clip_cxr.eval.encode import embed_shards
    from open_clip_cxr.eval.retrieval import recall_at_k
    from accelerate.utils import DistributedType
    out = {}
    # FSDP shards the weights: every rank must run the same forwards (each embeds the whole set)
    everyone = accelerator.distributed_type == DistributedType.FSDP
    if accelerator.is_main_process or everyone:
        was_training = model.training
        model.eval()
        with accelerator.autocast():
            emb = embed_shards(model, preprocess, tokenizer, urls, batch_size=batch_size, device=accelerator.device,
                               progress=False, source=SampleSource(urls, preprocess=preprocess, world_size=1, rank=0))
        model.train(was_training)
        r = recall_at_k(emb.image_emb.float(), emb.image_study_ids, emb.text_emb.float(), emb.text_study_ids)
        out = {f"val/i2t_{k}": v for k, v in r["image_to_text"].items()}
        out.update({f"val/t2i_{k}": v for k, v in r["text_to_image"].items()})
        out["val/mean_recall"] = r["mean_recall"]
    accelerator.wait_for_everyone()
    return out if accelerator.is_main_process else {}
