"""Stage 1, step 2: supervised contrastive training (`training/supcon.py`) of LoRA + pooler + norm.

- the model: the tower with a fresh LoRA (`supcon.lora`; null: the pooler and norm alone),
  embedding texts whole (`Embedder`) or from cached lower layers (`supcon.cache`:
  `TextStateCache` + `CachedEmbedder`) - `supcon_module`;
- the batch maker: (anchor, positive, hard negatives) examples, or (`supcon.views` > 2) V texts
  of each report and its hard negatives, a pure function of the micro-batch index - `SupconBatches`;
- the loss: InfoNCE over in-batch and hard negatives - `supcon_step`; SupCon over every text of
  the step, several positives per query - `multiview_step`;
- the fact head (`supcon.fact_weight` > 0, `training/fact_head.py`): a linear read-out of the
  clinical facts of every text of the step, trained with the tower and dropped after;
- `supcon_phase`: optionally `supcon.head_steps` of the pooler alone, then everything, both
  through the shared loop (`stage1_run.run_stage`), then the LoRA merged.
"""
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Union

import torch

from open_clip_cxr.reports.borrowed import pool_or_none
from open_clip_cxr.reports.variants import base_text
from open_clip_cxr.text.instructions import with_instruction
from open_clip_cxr_train.fact_head import WithFactHead, fact_loss, fact_targets
from open_clip_cxr_train.speedups import FrozenCast
from open_clip_cxr_train.stage1_data import StepData
from open_clip_cxr_train.stage1_run import run_stage
from open_clip_cxr_train.stage1_model import cache_rate, contrastive_flops_per_token, set_lora, trainable
from open_clip_cxr_train.supcon import (INSTRUCTIONS, Example, Views, report_texts, sample_example, sample_views,
                                        text_key)
from open_clip_cxr_train.supcon_loss import multiview_supcon_loss, supcon_loss
from open_clip_cxr_train.text_embed import CachedEmbedder, Embedder, TextStateCache, cue_token_mask
from open_clip_cxr_train.weight_average import WeightAverage


@dataclass
class SupconData:
    """What the batches are drawn from: `texts_of(i, epoch)` -> `ReportTexts` of item i."""
    module: torch.nn.Module
    texts_of: Callable
    n_items: int
    cache: Optional[TextStateCache] = None
    base_of: Optional[Callable] = None   # item i -> its report text (`supcon.neighbour_batches` groups by it)


def supcon_module(run, scfg: dict, top: int) -> SupconData:
    """The module a step runs and the texts it reads: every report's texts re-drawn each epoch,
    or (`supcon.cache`) a fixed subset whose texts are encoded once below the top `top` layers."""
    seed, reports, acc = run.seed, run.reports, run.accelerator
    max_variants = scfg.get("max_variants")
    texts_fn = report_texts   # supcon.variants: rules (default) | llm | both (checked LLM rewrites)
    if scfg.get("variants", "rules") != "rules":
        from open_clip_cxr.reports.paraphrase import llm_report_texts
        texts_fn = llm_report_texts(report_texts, reports, scfg, run.out / "work" / "llm_variants", acc.print)
    text_kw = {"phrases": float(scfg.get("p_phrases", 0.0)) > 0, "styles": scfg.get("variant_styles"),  # null: every style
               "negative_seeds": int(scfg.get("negative_seeds", 1)),      # one-error copies drawn k times
               "laterality_copies": int(scfg.get("laterality_copies", 0)),  # + one-word side swaps
               "context_lines_p": float(scfg.get("context_lines_p", 0.0)),  # rewrites under exam lines
               "borrowed": pool_or_none(reports, log=acc.print,     # + copies with other reports' sentences
                                        **{k: int(scfg.get(f"borrowed_{k}", 0))
                                           for k in ("insertions", "negations", "absent_swaps", "rewordings")})}
    max_tokens = int(run.recipe["train"].get("max_tokens", 4096))
    if not scfg.get("cache"):
        return SupconData(Embedder(run.tower, run.pad, max_tokens),
                          lambda i, epoch: texts_fn(reports[i], seed * 10_007 + epoch, max_variants, **text_kw),
                          len(reports), base_of=lambda i: base_text(reports[i]) or "")
    n_cache = int(scfg.get("cache_reports") or len(reports))
    pick = random.Random(seed + 2).sample(range(len(reports)), min(n_cache, len(reports)))
    pool = [t for t in (texts_fn(reports[i], seed, max_variants, **text_kw) for i in pick) if t and t.variants]
    cache = TextStateCache(run.tower, run.tokenizer, [x for t in pool for x in t.all_texts()], top,
                           run.max_length, max_tokens, dtype=run.low)
    rate = cache_rate(run.tower, cache, run.low)
    acc.print(f"supcon: cached {len(cache)} texts of {len(pool)} reports below the top "
              f"{cache.k} layers in {cache.seconds:.0f} s: {rate['texts_per_s']:.1f} texts/s, "
              f"{rate['gflops']:.1f} GFLOP/s ({rate['of_peak']:.0%} of the measured "
              f"{rate['precision']} linear peak)")
    run.summary["cache"] = rate     # summary.json
    if float(scfg.get("llm_variant_p", 0.0)):     # say what the key acts on: a pool without LLM rewrites ignores it
        n_llm = sum(1 for t in pool if t.llm_variants)
        acc.print(f"supcon: llm_variant_p {float(scfg['llm_variant_p']):g} acts on the {n_llm} of {len(pool)} cached "
                  "reports with a checked LLM rewrite" + ("" if n_llm else ": none, so it changes nothing"))
    if float(scfg.get("instruction_prob", 0.0)):
        raise ValueError("supcon.cache reads fixed texts: set supcon.instruction_prob to 0")
    p_drop = float(scfg.get("token_dropout", 0.0))
    embedder = CachedEmbedder(run.tower, cache, max_tokens, p_drop, cue_token_mask(run.tokenizer) if p_drop else None)
    return SupconData(embedder, lambda i, epoch: pool[i], len(pool), cache, lambda i: pool[i].base)


class SupconBatches:
    """`batches(micro)` -> (inputs, negative slots, anchor keys, positive keys, token count), or with
    `views` > 2 (inputs, view slots, negative slots, text keys of views + negatives, token count)."""

    def __init__(self, run, scfg: dict, data: SupconData):
        self.seed, self.tokenizer, self.max_length, self.pad = run.seed, run.tokenizer, run.max_length, run.pad
        self.texts_of, self.n_items, self.cache = data.texts_of, data.n_items, data.cache
        self.n_neg = int(scfg.get("n_negatives", 2))
        self.p_sections, self.p_instr = float(scfg.get("p_sections", 0.3)), float(scfg.get("instruction_prob", 0.0))
        self.p_phrases = float(scfg.get("p_phrases", 0.0))
        self.p_llm = float(scfg.get("llm_variant_p", 0.0))
        self.section_negs = bool(scfg.get("section_negatives", False))
        self.views = int(scfg.get("views", 2))
        self.facts = float(scfg.get("fact_weight", 0.0)) > 0   # also the fact targets of every text
        group = int(scfg.get("neighbour_batches", 1))
        neighbours = None
        if group > 1:   # each report beside its nearest training reports: near-duplicates as in-batch negatives
            from open_clip_cxr_train.neighbour_batches import lexical_neighbours
            t0, bases = time.perf_counter(), [data.base_of(i) for i in range(data.n_items)]
            neighbours = lexical_neighbours(bases, 4 * (group - 1))
            run.accelerator.print(f"supcon: micro-batches in runs of {group} lexical neighbours, "
                                  f"{len(set(bases))} distinct report texts, {time.perf_counter() - t0:.1f} s")
        self.data = StepData(data.n_items, int(scfg["batch_size"]), run.seed + 1, run.world, run.rank,
                             neighbours, group)

    def _sample(self, texts, rng) -> Union[Example, Views, None]:
        if self.views > 2:
            return sample_views(texts, rng, self.views, self.p_sections, self.n_neg, self.p_phrases)
        return sample_example(texts, rng, self.p_sections, self.n_neg, self.p_phrases, self.p_llm, self.section_negs)

    def examples(self, micro: int) -> List[Union[Example, Views]]:
        examples = []
        for epoch, i in self.data(micro):
            rng = random.Random(hash((self.seed, epoch, i, micro)) & 0xFFFFFFFF)
            ex = None
            while ex is None:      # a report with nothing to pair: draw another
                texts = self.texts_of(i, epoch)
                ex = self._sample(texts, rng) if texts else None
                i = rng.randrange(self.n_items)
            if self.views == 2 and self.p_instr and rng.random() < self.p_instr:
                ex.anchor = with_instruction(ex.anchor, INSTRUCTIONS[ex.task], self.tokenizer)[0]
            examples.append(ex)
        return examples

    def _encode(self, texts: List[str]):
        """(token ids or cache rows of `texts`, their token count)."""
        cache = self.cache
        inputs = cache.rows(texts) if cache is not None else self.tokenizer(texts, context_length=self.max_length)
        n_tokens = sum(cache.ids[r].numel() for r in inputs.tolist()) if cache is not None \
            else int((inputs != self.pad).sum())
        return inputs, torch.tensor(n_tokens)

    def _views_batch(self, groups: List[Views]):
        # report j's views go to slots j*V.., its negatives to j*H..: fixed-size padded tensors
        # after the forward, so every process gathers the same shapes
        texts, vslots, negs, nslots = [], [], [], []
        for j, g in enumerate(groups):
            vslots += [j * self.views + k for k in range(len(g.texts))]
            nslots += [j * self.n_neg + k for k in range(len(g.negatives))]
            texts += g.texts
            negs += g.negatives
        inputs, n_tokens = self._encode(texts + negs)
        keys = torch.tensor([text_key(t) for t in texts + negs])
        return inputs, torch.tensor(vslots), torch.tensor(nslots, dtype=torch.long), keys, n_tokens

    def __call__(self, micro: int):
        examples = self.examples(micro)
        if self.views > 2:
            return self._views_batch(examples)
        negs, slots = [], []
        for j, ex in enumerate(examples):
            for k, t in enumerate(ex.negatives):
                negs.append(t)
                slots.append(j * self.n_neg + k)
        texts = [e.anchor for e in examples] + [e.positive for e in examples] + negs
        inputs, n_tokens = self._encode(texts)
        akeys = torch.tensor([text_key(e.anchor) for e in examples])
        pkeys = torch.tensor([text_key(e.positive) for e in examples])
        batch = (inputs, torch.tensor(slots, dtype=torch.long), akeys, pkeys, n_tokens)
        return batch + (fact_targets(texts),) if self.facts else batch


def supcon_step(module, batch, device, bs: int, n_neg: int, temperature: float, symmetric: bool,
                negative_weight: float = 1.0, fact_weight: float = 0.0):
    """(loss, samples, tokens): anchors, positives and the padded hard negatives embedded in one
    forward; with `fact_weight` (a `WithFactHead` module, fact targets last in the batch) plus
    that weight times the fact loss of every text."""
    inputs, slots, akeys, pkeys, n_tokens, *facts = (t.to(device) for t in batch)
    emb = module(inputs)
    if fact_weight:
        emb, logits = emb
    a, p, n = emb[:bs], emb[bs:2 * bs], emb[2 * bs:]
    neg = torch.zeros(bs * n_neg, emb.shape[1], dtype=emb.dtype, device=emb.device).index_copy(0, slots, n)
    valid = torch.zeros(bs * n_neg, dtype=torch.bool, device=emb.device)
    valid[slots] = True
    loss = supcon_loss(a, p, neg, temperature, akeys, pkeys, valid, symmetric=symmetric,
                       negative_weight=negative_weight)
    if fact_weight:
        loss = loss + fact_weight * fact_loss(logits, facts[0])
    return loss, bs, int(n_tokens)


def _padded(rows, slots, per: int, size: int):
    """`rows` placed at `slots` of `size` zero rows, and each row's report (slot // per; -1: padding)."""
    out = torch.zeros(size, *rows.shape[1:], dtype=rows.dtype, device=rows.device).index_copy(0, slots, rows)
    owner = torch.full((size,), -1, dtype=torch.long, device=rows.device).index_copy(0, slots, slots // max(per, 1))
    return out, owner


def multiview_step(module, batch, device, bs: int, views: int, n_neg: int, temperature: float):
    """(loss, samples, tokens) of `supcon.views` > 2: every view and hard negative embedded in one
    forward, padded to bs * views and bs * n_neg rows, scored by `multiview_supcon_loss`."""
    inputs, vslots, nslots, keys, n_tokens = (t.to(device) for t in batch)
    emb, nv = module(inputs), vslots.shape[0]
    v, owner = _padded(emb[:nv], vslots, views, bs * views)
    k, _ = _padded(keys[:nv], vslots, views, bs * views)
    n, n_owner = _padded(emb[nv:], nslots, n_neg, bs * n_neg)
    nk, _ = _padded(keys[nv:], nslots, n_neg, bs * n_neg)
    loss = multiview_supcon_loss(v, owner, n, n_owner, temperature, k, nk)
    return loss, bs, int(n_tokens)


def supcon_phase(run, start_step: int) -> int:
    """The contrastive step after global step `start_step` (`supcon.steps`; 0: skipped)."""
    scfg = run.recipe.get("supcon") or {}
    s_steps = int(scfg.get("steps", 0))
    if s_steps <= 0:
        return 0
    tower = run.tower
    torch.manual_seed(run.seed + 1)
    lora_cfg = scfg.get("lora")     # None: the pooler and norm alone
    set_lora(tower, lora_cfg)
    for m in (tower.pooler, tower.norm):   # random for SmolLM2: they must learn here
        m.requires_grad_(True)
    cast = FrozenCast(tower, run.frozen_dtype)
    n_layers = tower.config.llm_config().num_hidden_layers
    top = min(int(lora_cfg.get("layers") or n_layers), n_layers) if lora_cfg else 0   # adapted layers
    data = supcon_module(run, scfg, top)
    batches = SupconBatches(run, scfg, data)
    kw = dict(device=run.accelerator.device, bs=int(scfg["batch_size"]), n_neg=batches.n_neg,
              temperature=float(scfg.get("temperature", 0.05)))
    fact_weight = float(scfg.get("fact_weight", 0.0))
    module = data.module
    if fact_weight:     # a read-out of the clinical facts, trained at the pooler's rate and dropped after
        module = WithFactHead(module, tower.config.hidden_size,
                              float(scfg.get("fact_cosine_scale", 0.0))).to(run.accelerator.device)
    if batches.views > 2:   # SupCon: every view is a query, so `symmetric` has nothing to add
        step = partial(multiview_step, views=batches.views, **kw)
    else:
        step = partial(supcon_step, symmetric=bool(scfg.get("symmetric", True)),
                       negative_weight=float(scfg.get("negative_weight", 1.0)), fact_weight=fact_weight, **kw)
    head = [p for m in (tower.pooler, tower.norm) for p in m.parameters()]
    if fact_weight:
        head += list(module.head.parameters())
    head_ids = {id(p) for p in head}
    lora_params = [p for p in trainable(tower) if id(p) not in head_ids]
    lr = float(scfg.get("lr", 2e-4))
    groups = [{"params": lora_params, "lr": lr}, {"params": head, "lr": float(scfg.get("head_lr", 10 * lr))}]
    # per token, for the MFU of the step lines (before 2026-12-08 the pooler's forward and input
    # gradients were left out: a pooler-only step logged a third of its MFU)
    run_layers = top if data.cache is not None else n_layers
    flops = contrastive_flops_per_token(tower, run_layers, top)
    head_steps = int(scfg.get("head_steps", 0))
    if head_steps:
        # the random pooler first, alone: with the LoRA frozen nothing below the pooler needs
        # a backward pass, so (cached) a step costs a third; then LoRA and pooler together
        for p in lora_params:
            p.requires_grad_(False)
        module = run_stage(run, "supcon_head", module, groups[1:], {**scfg, "steps": head_steps}, start_step,
                           batches, step, contrastive_flops_per_token(tower, run_layers, 0))
        for p in lora_params:
            p.requires_grad_(True)
    accum = int(run.recipe["train"].get("grad_accum_steps", 1))
    ema = float(scfg.get("ema_decay", 0.0))
    average = WeightAverage([p for g in groups for p in g["params"]], ema) if ema else None
    run_stage(run, "supcon", module, groups, scfg, start_step + head_steps,
              lambda micro: batches(micro + head_steps * accum),   # fresh batches after the head steps
              step, flops, average)
    if average is not None:     # the export reads the averaged weights (merged below with the LoRA)
        average.swap_in()
    cast.restore()
    set_lora(tower, None)
    return s_steps
