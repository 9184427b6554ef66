"""Stage 1: adapt the LLM text tower to chest X-ray reports, then export it.

    open-clip-cxr train-text --recipe training/recipes/text-cxr-llm-small-cpu.yaml --out runs/demo/stage1

1. Build the CLIP model the recipe names; only its text tower trains here (the vision tower
   and OpenCLIP's text projection are exported as initialised: stage 2 trains them).
2. MNTP (`training/mntp.py`): LoRA on attention and MLP projections; merged when done.
3. Supervised contrastive (`training/supcon.py`): a fresh LoRA (`supcon.lora`; null: none),
   plus the latent-attention pooler and the output norm (random for SmolLM2, so they MUST
   learn here); merged. `supcon.head_steps` first trains the pooler alone for that many steps.
4. Export OUT/ as an OpenCLIP folder (`open_clip.create_model_and_transforms('local-dir:OUT')`),
   with `metrics.jsonl` (step, stage, loss, lr, ...) and `eval.json`: the text-robustness suite
   on the validation split.

Rerunning the same command resumes: a finished MNTP is reloaded from its adapter, an
unfinished stage from its latest checkpoint under OUT/work/.

Speed on a CPU (why the recipe has the knobs it has): the frozen decoder weights are stored
in bf16 (autocast would otherwise re-cast every weight at every call), texts run in
length-sorted chunks (padding is paid for in full), and the contrastive LoRA sits in the top
`supcon.lora.layers` layers only. With `supcon.cache: true` the texts of a fixed set of
reports go through the layers below it once (`supcon.TextStateCache`), and each step runs
just those top layers and the pooler: the randomly initialised pooler needs hundreds of
steps, which a 135M decoder cannot give end to end on two CPU cores in an hour. The CPU
recipe goes further: `cxr-llm-small-l4` (SmolLM2's lowest 4 layers), every training report
cached, and the pooler alone trained on the cached states (see the recipe for the measurements).
"""
import argparse
import json
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from training import common
from training.towers import write_provenance
from open_clip_cxr.precision import choose as choose_precision
from training.speedups import FrozenCast, low_precision_dtype
from training.mntp import LORA_TARGETS, mntp_loss, mask_tokens, resolve_mask_token_id, special_token_ids, IGNORE
from open_clip_cxr.text.instructions import with_instruction
from training.supcon import (INSTRUCTIONS, CachedEmbedder, Embedder, Example, TextStateCache, length_chunks,
                             report_texts, sample_example, supcon_loss, text_key, training_split)

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "text-cxr-llm-small-cpu.yaml"


# ---------------------------------------------------------------- data

TABLE_KEYS = ("report_col", "findings_col", "impression_col", "study_col", "patient_col", "split_col")


def load_reports(data: dict, split: Optional[str]) -> list:
    """`Report`s of one split from `data`:
    `shards: <urls>` (txt/json of WebDataset shards, one report per study),
    `source: openi` (the Open-I tgz, `path:` optional; split by `hash_split` of the study id), or
    `source: table` with `path:` (a CSV/JSONL export; columns as `parsers.iter_table` names them)."""
    from open_clip_cxr.reports import parsers
    limit, source = data.get("limit"), data.get("source", "openi")
    if data.get("shards"):
        reports = list(_reports_from_shards(data["shards"]))
    elif source == "openi":
        reports = list(parsers.iter_openi_tgz(data.get("path"), on_error=lambda e: None))
    elif source == "table":
        cols = {k: data[k] for k in TABLE_KEYS if data.get(k)}
        reports = list(parsers.iter_table(data["path"], on_error=lambda e: None, **cols))
    else:
        raise ValueError(f"data: give `shards:` or `source: openi|table`, got {data}")
    hash_split = parsers.hash_split
    if split:
        reports = [r for r in reports if (r.split or hash_split(r.study_id)) == split]
    return reports[:limit] if limit else reports


def _reports_from_shards(urls):
    """One `Report` per study from the shards' json (sections) and txt; images are not read."""
    import webdataset as wds
    from open_clip_cxr.data.loader import expand_urls
    from open_clip_cxr.reports.types import Report
    seen = set()
    for s in wds.DataPipeline(wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples()):
        if "json" not in s:
            continue
        meta = json.loads(s["json"])
        sid = str(meta.get("study_id") or s["__key__"])
        if sid in seen:       # one sample per image: several per study
            continue
        seen.add(sid)
        sec = meta.get("sections") or {}
        yield Report(study_id=sid, source=meta.get("source", "shards"), findings=sec.get("findings", ""),
                     impression=sec.get("impression", ""), text=s.get("txt", b"").decode("utf-8"),
                     split=meta.get("split"), patient_id=meta.get("patient_id"))


class StepData:
    """Which reports micro-batch m of this process reads: a pure function of (seed, m), so a
    resumed run reads what an uninterrupted one would. Epochs are fresh permutations."""

    def __init__(self, n: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0):
        self.n, self.bs, self.seed, self.world, self.rank = n, batch_size, seed, world_size, rank
        self._perms: Dict[int, List[int]] = {}

    def _perm(self, epoch: int) -> List[int]:
        if epoch not in self._perms:
            self._perms = {epoch: random.Random(self.seed * 1_000_003 + epoch).sample(range(self.n), self.n)}
        return self._perms[epoch]

    def __call__(self, micro: int):
        """[(epoch, report index)] of micro-batch `micro`."""
        start = (micro * self.world + self.rank) * self.bs
        return [(p // self.n, self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.bs)]


# ---------------------------------------------------------------- model pieces

def build_model(name: str, text_arch: Optional[str] = None):
    """(CLIP model, tokenizer, model_cfg, preprocess_cfg) for a built-in name or `local-dir:DIR`.
    `text_arch` swaps in another text tower spec, e.g. `cxr-text:cxr-llm-small{"llm": {"num_hidden_layers": 3}}`
    (recipe key `text_arch`; same tokenizer): architecture ablations without a new model config."""
    import open_clip
    import open_clip_cxr  # noqa: F401  (registers our models)
    from open_clip_cxr.factory import PREPROCESS_CFGS
    if name.startswith("local-dir:"):
        cfg = json.loads((Path(name[len("local-dir:"):]) / "open_clip_config.json").read_text())
        model_cfg, preprocess_cfg = cfg["model_cfg"], cfg.get("preprocess_cfg")
    else:
        model_cfg, preprocess_cfg = open_clip.get_model_config(name), PREPROCESS_CFGS.get(name)
    kwargs = {}
    if text_arch:
        model_cfg = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], "hf_model_name": text_arch}}
        kwargs["text_cfg"] = model_cfg["text_cfg"]
    model, _, _ = open_clip.create_model_and_transforms(name, **kwargs)
    tokenizer = open_clip.get_tokenizer(name)
    return model, tokenizer, model_cfg, preprocess_cfg


def lora_targets(tower, lora: dict) -> List[str]:
    """`lora.target_modules`, limited to the top `lora.layers` decoder layers when set.

    Explicit module names ("layers.29.self_attn.q_proj"), because peft matches a target by
    suffix: frozen layers below the lowest adapter need no backward pass at all."""
    targets = list(lora.get("target_modules") or LORA_TARGETS)
    top = lora.get("layers")
    n_layers = tower.config.llm_config().num_hidden_layers
    if not top or top >= n_layers:
        return targets
    names = []
    for n, _ in tower.base_llm().named_modules():
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", n)
        if layer and int(layer.group(1)) >= n_layers - int(top) and n.rsplit(".", 1)[-1] in targets:
            names.append(n)
    return names


def set_lora(tower, lora: Optional[dict]):
    """Fold any current LoRA into the base weights, then wrap the decoder with `lora`."""
    tower.merge_lora()
    if lora:
        tower.config.lora = {"r": lora.get("r", 16), "alpha": lora.get("alpha", 32),
                             "dropout": lora.get("dropout", 0.05), "target_modules": lora_targets(tower, lora)}
        tower.enable_lora()
    return tower


def trainable(module) -> List[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def matmul_params(tower) -> int:
    """Parameters that take part in matmuls per token (embedding lookups excluded)."""
    emb = tower.base_llm().get_input_embeddings().weight.numel()
    return sum(p.numel() for p in tower.parameters()) - emb


# ---------------------------------------------------------------- encoding for evaluation

def tower_encode_fn(tower, tokenizer, max_length: Optional[int] = None, max_tokens: int = 4096,
                    dtype="auto", device="cpu"):
    """`encode_fn(list[str]) -> [N, D]` (L2-normalised) from the tower's pooled output, in
    length-sorted chunks under autocast: what the robustness suite calls. `dtype`: the
    autocast dtype, None for fp32, "auto" for what `open_clip_cxr.precision.choose` measures
    (`OPEN_CLIP_CXR_PRECISION` overrides)."""
    pad = tower.config.pad_token_id
    if isinstance(dtype, str):
        dtype = choose_precision(dtype, device).dtype

    @torch.no_grad()
    def encode(texts):
        tower.eval()
        ids = tokenizer(list(texts), context_length=max_length) if max_length else tokenizer(list(texts))
        mask = ids != pad
        out = torch.zeros(len(texts), tower.config.hidden_size)
        for idx in length_chunks(mask.sum(1).tolist(), max_tokens):
            rows = torch.tensor(idx)
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                pooled = tower(input_ids=ids[rows].to(device), attention_mask=mask[rows].to(device)).pooler_output
            out[rows] = pooled.float().cpu()
        return nn.functional.normalize(out, dim=-1)
    return encode


# ---------------------------------------------------------------- one stage's loop

class MNTPModel(nn.Module):
    """The MNTP loss as one module (one forward per step, as DDP wants), length-chunked."""

    def __init__(self, tower, max_tokens: int):
        super().__init__()
        self.tower, self.max_tokens = tower, max_tokens

    def forward(self, input_ids, attention_mask, labels):
        total = (labels[:, 1:] != IGNORE).sum().clamp_min(1)
        loss = 0.0
        for idx in length_chunks(attention_mask.sum(1).tolist(), self.max_tokens):
            rows = torch.tensor(idx, device=input_ids.device)
            n = (labels[rows, 1:] != IGNORE).sum()
            if n:
                loss = loss + mntp_loss(self.tower, input_ids[rows], attention_mask[rows], labels[rows]) * n
        return loss / total


class StopAfter(Exception):
    """`train.stop_after` reached: the checkpoint is written and the run ends there (a planned
    interruption; rerunning the same recipe resumes from it)."""


def _stage_loop(accelerator, recipe, name, module, param_groups, cfg, state, start_step, make_batch, step_fn,
                tokens_flops, writer):
    """Optimise `module` for cfg['steps'] steps after global step `start_step`; checkpoints under
    OUT/work/<name>. `make_batch(micro)` -> batch; `step_fn(module, batch)` -> (loss, samples, tokens)."""
    work = os.path.join(recipe["output_dir"], "work", name)
    steps = int(cfg["steps"])
    param_groups = [g for g in param_groups if g["params"]]    # e.g. no LoRA group when only the pooler trains
    optimizer = torch.optim.AdamW(param_groups, weight_decay=float(cfg.get("weight_decay", 0.0)), betas=(0.9, 0.98))
    scheduler = common.cosine_with_warmup(optimizer, int(cfg.get("warmup_steps", 0)), steps,
                                          float(cfg.get("min_lr_ratio", 0.1)))
    n_train = sum(p.numel() for g in param_groups for p in g["params"])
    accelerator.print(f"{name}: {steps} steps, {n_train:,} trainable parameters")
    module, optimizer = accelerator.prepare(module, optimizer)
    if common.resume_from_checkpoint(accelerator, work, state, strict=False):
        with warnings.catch_warnings():   # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(state.step - start_step):   # the schedule is a pure function of the step
                scheduler.step()
    accum = accelerator.gradient_accumulation_steps
    log_every, ckpt_every = int(recipe["train"].get("log_every", 10)), int(recipe["train"].get("checkpoint_every", 0))
    stop_after = int(recipe["train"].get("stop_after") or 0)
    run_dtype = low_precision_dtype(accelerator.mixed_precision) or torch.float32   # what the steps compute in
    peak = common.peak_flops(accelerator.device, run_dtype)    # measured once per process, before any step
    meter = common.Throughput(flops_per_token=tokens_flops, peak=peak * accelerator.num_processes)
    peak_info = {"precision": common.precision_name(run_dtype), "threads": torch.get_num_threads(),
                 "peak_gflops": round(peak * accelerator.num_processes / 1e9, 1)}   # what mfu is against
    bar = common.progress_bar(steps, state.step - start_step, not accelerator.is_main_process, desc=name)
    module.train()
    t_log, losses = time.time(), []
    while state.step < start_step + steps:
        local = state.step - start_step
        for a in range(accum):
            with accelerator.accumulate(module):
                loss, n_samples, n_tokens = step_fn(module, make_batch(local * accum + a))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(module.parameters(), float(cfg.get("grad_clip", 1.0)))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float().item())
            meter.update(n_samples * accelerator.num_processes, n_tokens * accelerator.num_processes, steps=0)
        lrs = scheduler.get_last_lr()      # the rates this step used
        lr = lrs[0]
        scheduler.step()
        state.step += 1
        state.samples_seen += cfg["batch_size"] * accum * accelerator.num_processes
        meter.steps += 1
        bar.update(1)
        loss_avg = sum(losses[-accum:]) / accum
        record = {"step": state.step, "stage": name, "loss": loss_avg, "lr": lr}
        if len(lrs) > 1:
            record["lr_head"] = lrs[-1]
        writer.write(record)
        accelerator.log({f"{name}/loss": loss_avg, f"{name}/lr": lr}, step=state.step)
        done = state.step == start_step + steps
        if state.step % log_every == 0 or done:
            stats = meter.stats(time.time() - t_log)
            if stats["mfu"] > 100 and accelerator.device.type == "cpu":
                # the machine was busier when the peak was probed: probe again, between steps
                fresh = common.peak_flops(accelerator.device, run_dtype, refresh=True) * accelerator.num_processes
                stats["mfu"] *= meter.peak / fresh
                meter.peak = fresh
                peak_info["peak_gflops"] = round(fresh / 1e9, 1)
            t_log = time.time()
            bar.set_postfix(loss=f"{loss_avg:.3f}")
            if accelerator.is_main_process:
                common.log_line(state.step, {"stage": name, "loss": sum(losses) / len(losses), "lr": lr,
                                             **stats, **({"lr_head": lrs[-1]} if len(lrs) > 1 else {})})
                writer.write({**record, "loss_mean": sum(losses) / len(losses), **stats, **peak_info})
            losses = []
        stopping = bool(stop_after) and state.step >= stop_after and not done
        if (ckpt_every and state.step % ckpt_every == 0) or done or stopping:
            common.save_checkpoint(accelerator, work, state, keep_last=1)
        if stopping:
            bar.close()
            accelerator.end_training()
            raise StopAfter(state.step)
    bar.close()
    module = accelerator.unwrap_model(module)
    accelerator.free_memory()
    return module


# ---------------------------------------------------------------- the stage

def train(recipe: dict) -> dict:
    """Run stage 1 per `recipe` (see the CPU recipe for every key); returns a summary dict
    (`{"stopped_at": step}` when `train.stop_after` ends it early)."""
    try:
        return _train(recipe)
    except StopAfter as stop:
        return {"stopped_at": stop.args[0]}


def _train(recipe: dict) -> dict:
    t0 = time.time()
    from training.recipe_check import check_before_work   # refused recipes and data leave no run folder
    recipe = dict(check_before_work(recipe, "text"))
    recipe.setdefault("train", {})
    out = Path(recipe.setdefault("output_dir", "runs/stage1"))
    accelerator = common.setup_accelerator(recipe)
    common.init_tracking(accelerator, recipe, "text_stage")
    common.keep_trainable_only(accelerator)   # checkpoints hold LoRA + pooler, not the 135M base
    seed = int(recipe.get("seed", 0))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        common.save_recipe(recipe, str(out / "recipe.yaml"))
    writer = common.MetricsWriter(str(out / "metrics.jsonl"), enabled=accelerator.is_main_process)

    model, tokenizer, model_cfg, preprocess_cfg = build_model(recipe.get("model", "cxr-llm-small"),
                                                              recipe.get("text_arch"))
    tower = model.text.transformer
    tower.requires_grad_(False)
    tower.to(accelerator.device)
    pad = tower.config.pad_token_id
    max_length = int(recipe.get("max_length", 128))
    low = low_precision_dtype(accelerator.mixed_precision)    # None when auto chose fp32
    frozen_dtype = low if recipe["train"].get("frozen_low_precision", True) else None
    accelerator.print(common.peak_header(accelerator.device, low or torch.float32, accelerator.num_processes))
    state = common.TrainState()
    accelerator.register_for_checkpointing(state)

    reports = load_reports(recipe.get("data", {}), training_split(recipe))   # never a test split
    if not reports:
        raise ValueError("no training reports: check `data` in the recipe")
    accelerator.print(f"stage 1: {len(reports)} training reports, model {recipe.get('model', 'cxr-llm-small')}")
    world, rank = accelerator.num_processes, accelerator.process_index
    summary = {"output_dir": str(out), "n_train_reports": len(reports)}

    # -- MNTP ------------------------------------------------------------------------------
    from open_clip_cxr.reports.variants import base_text
    mcfg = recipe.get("mntp") or {}
    m_steps = int(mcfg.get("steps", 0))
    adapter_path = out / "work" / "mntp" / "adapter.pt"
    if m_steps > 0:
        torch.manual_seed(seed)
        set_lora(tower, {**mcfg.get("lora", {}), "target_modules": mcfg.get("lora", {}).get("target_modules", LORA_TARGETS)})
        if adapter_path.exists():
            from open_clip_cxr.text.lora import load_adapter_state_dict
            load_adapter_state_dict(tower.llm, torch.load(adapter_path, map_location="cpu", weights_only=True))
            state.step = max(state.step, m_steps)
            accelerator.print(f"MNTP: reusing {adapter_path}")
        else:
            mask_id = resolve_mask_token_id(tokenizer, mcfg.get("mask_token", "_"))
            specials = special_token_ids(tokenizer, [tower.config.instruction_separator_id, pad])
            texts = [base_text(r) for r in reports]
            data = StepData(len(texts), int(mcfg["batch_size"]), seed, world, rank)
            gen = torch.Generator().manual_seed(seed * 7919 + rank)

            def mntp_batch(micro):
                gen.manual_seed(seed * 7919 + micro * world + rank)   # resumable: a function of micro
                ids = tokenizer([texts[i] for _, i in data(micro)], context_length=max_length)
                mask = ids != pad
                masked, labels = mask_tokens(ids, mask, mask_id, specials, float(mcfg.get("mask_prob", 0.2)), gen)
                return masked, mask, labels

            def mntp_step(module, batch):
                ids, mask, labels = (t.to(accelerator.device) for t in batch)
                return module(ids, mask, labels), ids.shape[0], int(mask.sum())

            cast = FrozenCast(tower, frozen_dtype)
            n_mm, n_tr = matmul_params(tower), sum(p.numel() for p in trainable(tower))
            groups = [{"params": trainable(tower), "lr": float(mcfg.get("lr", 2e-4))}]
            _stage_loop(accelerator, recipe, "mntp", MNTPModel(tower, int(recipe["train"].get("max_tokens", 4096))),
                        groups, mcfg, state, 0, mntp_batch, mntp_step,
                        common.flops_per_sample_transformer(n_mm, 1, n_tr), writer)
            cast.restore()
            if accelerator.is_main_process:
                from open_clip_cxr.text.lora import adapter_state_dict
                torch.save(adapter_state_dict(tower.llm), adapter_path)
        set_lora(tower, None)   # merge MNTP into the base weights
    summary["mntp_steps"] = m_steps

    # -- supervised contrastive ---------------------------------------------------------------
    scfg = recipe.get("supcon") or {}
    s_steps = int(scfg.get("steps", 0))
    if s_steps > 0:
        torch.manual_seed(seed + 1)
        lora_cfg = scfg.get("lora")     # None: the pooler and norm alone
        set_lora(tower, lora_cfg)
        for m in (tower.pooler, tower.norm):   # random for SmolLM2: they must learn here
            m.requires_grad_(True)
        cast = FrozenCast(tower, frozen_dtype)
        bs, n_neg = int(scfg["batch_size"]), int(scfg.get("n_negatives", 2))
        p_sections, p_instr = float(scfg.get("p_sections", 0.3)), float(scfg.get("instruction_prob", 0.0))
        max_variants = scfg.get("max_variants")
        texts_fn = report_texts   # supcon.variants: rules (default) | llm | both (checked LLM rewrites)
        if scfg.get("variants", "rules") != "rules":
            from open_clip_cxr.reports.paraphrase import llm_report_texts
            texts_fn = llm_report_texts(report_texts, reports, scfg, out / "work" / "llm_variants", accelerator.print)
        p_phrases = float(scfg.get("p_phrases", 0.0))     # sentence-level abbreviation pairs (supcon.py)
        text_kw = {"phrases": p_phrases > 0, "styles": scfg.get("variant_styles"),   # null: every style
                   "negative_seeds": int(scfg.get("negative_seeds", 1))}            # one-error copies drawn k times
        max_tokens = int(recipe["train"].get("max_tokens", 4096))
        n_layers = tower.config.llm_config().num_hidden_layers
        top = min(int(lora_cfg.get("layers") or n_layers), n_layers) if lora_cfg else 0   # adapted layers
        cache = None
        if scfg.get("cache"):
            # a fixed subset of reports, their texts encoded once below the adapted layers
            n_cache = int(scfg.get("cache_reports") or len(reports))
            pick = random.Random(seed + 2).sample(range(len(reports)), min(n_cache, len(reports)))
            pool = [t for t in (texts_fn(reports[i], seed, max_variants, **text_kw) for i in pick)
                    if t and t.variants]
            cache = TextStateCache(tower, tokenizer, [x for t in pool for x in t.all_texts()], top,
                                   max_length, max_tokens, dtype=low)
            rate = cache_rate(tower, cache, low)
            accelerator.print(f"supcon: cached {len(cache)} texts of {len(pool)} reports below the top "
                              f"{cache.k} layers in {cache.seconds:.0f} s: {rate['texts_per_s']:.1f} texts/s, "
                              f"{rate['gflops']:.1f} GFLOP/s ({rate['of_peak']:.0%} of the measured "
                              f"{rate['precision']} linear peak)")
            summary["cache"] = rate     # summary.json
            if p_instr:
                raise ValueError("supcon.cache reads fixed texts: set supcon.instruction_prob to 0")
            module = CachedEmbedder(tower, cache, max_tokens)
            texts_of = lambda i, epoch: pool[i]    # noqa: E731
            n_items = len(pool)
        else:
            module = Embedder(tower, pad, max_tokens)
            texts_of = lambda i, epoch: texts_fn(reports[i], seed * 10_007 + epoch, max_variants,  # noqa: E731
                                                 **text_kw)
            n_items = len(reports)
        data = StepData(n_items, bs, seed + 1, world, rank)

        def supcon_batch(micro):
            examples: List[Example] = []
            for epoch, i in data(micro):
                rng = random.Random(hash((seed, epoch, i, micro)) & 0xFFFFFFFF)
                ex = None
                while ex is None:      # a report with nothing to pair: draw another
                    texts = texts_of(i, epoch)
                    ex = sample_example(texts, rng, p_sections, n_neg, p_phrases) if texts else None
                    i = rng.randrange(n_items)
                if p_instr and rng.random() < p_instr:
                    ex.anchor = with_instruction(ex.anchor, INSTRUCTIONS[ex.task], tokenizer)[0]
                examples.append(ex)
            negs, slots = [], []
            for j, ex in enumerate(examples):
                for k, t in enumerate(ex.negatives):
                    negs.append(t)
                    slots.append(j * n_neg + k)
            texts = [e.anchor for e in examples] + [e.positive for e in examples] + negs
            inputs = cache.rows(texts) if cache is not None else tokenizer(texts, context_length=max_length)
            akeys = torch.tensor([text_key(e.anchor) for e in examples])
            pkeys = torch.tensor([text_key(e.positive) for e in examples])
            n_tokens = sum(cache.ids[r].numel() for r in inputs.tolist()) if cache is not None \
                else int((inputs != pad).sum())
            return inputs, torch.tensor(slots, dtype=torch.long), akeys, pkeys, torch.tensor(n_tokens)

        def supcon_step(module, batch):
            inputs, slots, akeys, pkeys, n_tokens = (t.to(accelerator.device) for t in batch)
            emb = module(inputs)
            a, p, n = emb[:bs], emb[bs:2 * bs], emb[2 * bs:]
            neg = torch.zeros(bs * n_neg, emb.shape[1], dtype=emb.dtype, device=emb.device).index_copy(0, slots, n)
            valid = torch.zeros(bs * n_neg, dtype=torch.bool, device=emb.device)
            valid[slots] = True
            loss = supcon_loss(a, p, neg, float(scfg.get("temperature", 0.05)), akeys, pkeys, valid,
                               symmetric=bool(scfg.get("symmetric", True)))
            return loss, bs, int(n_tokens)

        head = [p for m in (tower.pooler, tower.norm) for p in m.parameters()]
        head_ids = {id(p) for p in head}
        lora_params = [p for p in trainable(tower) if id(p) not in head_ids]
        lr = float(scfg.get("lr", 2e-4))
        groups = [{"params": lora_params, "lr": lr}, {"params": head, "lr": float(scfg.get("head_lr", 10 * lr))}]
        # per token: forward through the decoder (none of it when cached), backward from the
        # lowest adapted layer up, and the trainable weights' own gradients
        n_mm = matmul_params(tower)
        fwd = 2.0 * n_mm * (top / n_layers if cache is not None else 1.0)
        flops = fwd + 2.0 * n_mm * top / n_layers + 2.0 * sum(p.numel() for p in trainable(tower))
        head_steps = int(scfg.get("head_steps", 0))
        if head_steps:
            # the random pooler first, alone: with the LoRA frozen nothing below the pooler needs
            # a backward pass, so (cached) a step costs a third; then LoRA and pooler together
            for p in lora_params:
                p.requires_grad_(False)
            module = _stage_loop(accelerator, recipe, "supcon_head", module, groups[1:],
                                 {**scfg, "steps": head_steps}, state, m_steps, supcon_batch, supcon_step,
                                 fwd + 2.0 * sum(p.numel() for p in head), writer)
            for p in lora_params:
                p.requires_grad_(True)
        accum = int(recipe["train"].get("grad_accum_steps", 1))
        _stage_loop(accelerator, recipe, "supcon", module, groups, scfg, state, m_steps + head_steps,
                    lambda micro: supcon_batch(micro + head_steps * accum),   # fresh batches after the head steps
                    supcon_step, flops, writer)
        cast.restore()
        set_lora(tower, None)
    summary["supcon_steps"] = s_steps
    summary["supcon_head_steps"] = int(scfg.get("head_steps", 0)) if s_steps > 0 else 0
    tower.requires_grad_(False)

    # -- export and evaluate ----------------------------------------------------------------
    if accelerator.is_main_process:
        from conversion.export import export_folder
        export_folder(model, model_cfg, tokenizer, out, preprocess_cfg=preprocess_cfg)
        write_provenance(out, stage1_provenance(recipe, m_steps, s_steps))
        accelerator.print(f"exported {out} (load with open_clip.create_model_and_transforms('local-dir:{out}'))")
        ecfg = recipe.get("eval") or {}
        if ecfg.get("enabled", True):
            summary["eval"] = evaluate(tower, tokenizer, recipe, device=accelerator.device)
            (out / "eval.json").write_text(json.dumps(summary["eval"], indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary["wall_s"] = round(time.time() - t0, 1)
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    return summary


def stage1_provenance(recipe: dict, mntp_steps: int, supcon_steps: int) -> dict:
    """The export's record of where its towers' weights came from: the text tower trained here;
    the vision tower never trained (stage 1 builds it without pretrained weights), so a CLIP
    stage started from this folder takes its vision weights elsewhere (`training/towers.py`)."""
    from training.towers import is_folder, read_provenance
    name = recipe.get("model", "cxr-llm-small")
    vision = {"init": "random", "trained": False, "by": None}
    if is_folder(name):   # stage 1 continued from a folder: its vision tower is carried as it was
        vision = {**((read_provenance(name) or {}).get("vision") or {"init": f"{name} (unknown)", "trained": None})}
    text_arch = f" with text_arch {recipe['text_arch']}" if recipe.get("text_arch") else ""
    return {"text": {"init": f"{name}{text_arch}", "trained": True,
                     "by": f"train-text (MNTP {mntp_steps} steps, supervised contrastive {supcon_steps} steps)"},
            "vision": vision}
def cache_rate(tower, cache: TextStateCache, dtype: Optional[torch.dtype]) -> dict:
    """Throughput of text-state caching: texts/s, model GFLOP/s (2 x the matmul weights of the
    layers run, per real token: padding is not work) and its share of the measured `F.linear`
    peak of the precision in use (`open_clip_cxr.precision.peak_flops`)."""
    llm = tower.base_llm()
    n_run = len(llm.layers) - cache.k
    per_token = 2.0 * sum(p.numel() for layer in list(llm.layers)[:n_run] for p in layer.parameters() if p.dim() > 1)
    tokens = sum(int(i.numel()) for i in cache.ids)
    secs = max(cache.seconds, 1e-9)
    peak = common.peak_flops(next(tower.parameters()).device, dtype or torch.float32)
    flops = per_token * tokens / secs
    return {"texts": len(cache), "tokens": tokens, "seconds": round(secs, 2),
            "texts_per_s": round(len(cache) / secs, 2), "gflops": round(flops / 1e9, 2),
            "peak_gflops": round(peak / 1e9, 1), "of_peak": round(flops / peak, 4),
            "precision": "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
            "threads": torch.get_num_threads()}


def evaluate(tower, tokenizer, recipe: dict, device="cpu") -> dict:
    """The text-robustness suite on the validation split (`eval.split`, `eval.limit`)."""
    from open_clip_cxr.eval.robustness import format_table, run_robustness
    ecfg = recipe.get("eval") or {}
    data = {**recipe.get("data", {}), "limit": ecfg.get("limit")}
    reports = load_reports(data, ecfg.get("split", "validate"))
    if not reports:
        return {}
    # the run's precision (`resolved.precision`, else measured); `eval.bf16: true|false` forces
    run = (recipe.get("resolved") or {}).get("precision") or "auto"
    dtype = ({True: torch.bfloat16, False: None}[bool(ecfg["bf16"])] if "bf16" in ecfg
             else low_precision_dtype(choose_precision(run, device).mixed_precision))
    encode = tower_encode_fn(tower, tokenizer, device=device, dtype=dtype,
                             max_tokens=int(recipe.get("train", {}).get("max_tokens", 4096)))
    t = time.time()
    cast = FrozenCast(tower, dtype)
    try:
        res = run_robustness(reports, encode, seed=int(ecfg.get("seed", 0)))
    finally:
        cast.restore()
    res["eval_s"] = round(time.time() - t, 1)
    print(format_table({"stage 1": res}), flush=True)
    return res


# ---------------------------------------------------------------- CLI

from training.text_cli import add_arguments  # noqa: E402,F401  (the flags live there, free of torch: a fast --help)


def run(args: argparse.Namespace) -> int:
    recipe = common.load_recipe(args.recipe, args.overrides)
    if args.out:
        recipe["output_dir"] = args.out
    summary = train(recipe)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
