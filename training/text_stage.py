"""Stage 1: adapt the LLM text tower to chest X-ray reports, then export it.

    open-clip-cxr train-text --recipe training/recipes/text-cxr-llm-small-cpu.yaml --output-dir runs/demo/stage1

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
recipe goes further: `cxr-llm-small-l2` (SmolLM2's lowest 2 layers), every training report
cached, and the pooler alone trained on the cached states (see the recipe for the measurements).
"""
import argparse
import json
import time
from pathlib import Path

import torch

from open_clip_cxr_train import accel, common
from open_clip_cxr_train.checkpoints import RunLock, TrainState, keep_trainable_only
from open_clip_cxr_train.logs import MetricsWriter
from open_clip_cxr_train.loop import StopAfter
from open_clip_cxr_train.speedups import FrozenCast, low_precision_dtype  # noqa: F401  (FrozenCast: the demo's import)
from open_clip_cxr_train.supcon import training_split
from open_clip_cxr_train.throughput import peak_header
# the pieces, importable from here as before
from open_clip_cxr_train.stage1_data import TABLE_KEYS, StepData, _reports_from_shards, load_reports  # noqa: F401
from open_clip_cxr_train.stage1_model import (MNTPModel, build_model, cache_rate, evaluate, lora_targets,  # noqa: F401
                                   set_lora, stage1_provenance, tower_encode_fn, trainable)
from open_clip_cxr_train.stage1_mntp import mntp_phase
from open_clip_cxr_train.stage1_run import Stage1Run, run_stage  # noqa: F401
from open_clip_cxr_train.stage1_supcon import supcon_phase

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "text-cxr-llm-small-cpu.yaml"


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
    from open_clip_cxr_train.recipe_check import check_before_work   # refused recipes and data leave no run folder
    accel.check_precision_env()
    recipe = dict(check_before_work(recipe, "text"))
    recipe.setdefault("train", {})
    out = Path(recipe.setdefault("output_dir", "runs/stage1"))
    accelerator = accel.setup_accelerator(recipe)
    with RunLock(str(out), enabled=accelerator.is_main_process):
        run = _start(accelerator, recipe, out)
        run.summary["mntp_steps"] = m_steps = mntp_phase(run)
        run.summary["supcon_steps"] = s_steps = supcon_phase(run, m_steps)
        run.summary["supcon_head_steps"] = int((recipe.get("supcon") or {}).get("head_steps", 0)) if s_steps else 0
        run.tower.requires_grad_(False)
        _export(run, m_steps, s_steps)
    run.summary["wall_s"] = round(time.time() - t0, 1)
    if accelerator.is_main_process:
        summary = {k: v for k, v in run.summary.items() if k != "eval"}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return run.summary


def _start(accelerator, recipe: dict, out: Path) -> Stage1Run:
    """Trackers, the run folder and its recipe, the model, the training reports."""
    accel.init_tracking(accelerator, recipe, "text_stage")
    keep_trainable_only(accelerator)   # checkpoints hold LoRA + pooler, not the 135M base
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        common.save_recipe(recipe, str(out / "recipe.yaml"))
    writer = MetricsWriter(str(out / "metrics.jsonl"), enabled=accelerator.is_main_process)
    model, tokenizer, model_cfg, preprocess_cfg = build_model(recipe.get("model", "cxr-llm-small"),
                                                              recipe.get("text_arch"), recipe.get("lowercase"))
    tower = model.text.transformer
    tower.requires_grad_(False)
    tower.to(accelerator.device)
    low = low_precision_dtype(accelerator.mixed_precision)    # None when auto chose fp32
    frozen_dtype = low if recipe["train"].get("frozen_low_precision", True) else None
    accelerator.print(peak_header(accelerator.device, low or torch.float32, accelerator.num_processes))
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    reports = load_reports(recipe.get("data", {}), training_split(recipe))   # never a test split
    if not reports:
        raise ValueError("no training reports: check `data` in the recipe")
    accelerator.print(f"stage 1: {len(reports)} training reports, model {recipe.get('model', 'cxr-llm-small')}")
    return Stage1Run(accelerator, recipe, state, writer, out, model, tokenizer, reports, low, frozen_dtype,
                     {"output_dir": str(out), "n_train_reports": len(reports)}, model_cfg, preprocess_cfg)


def _export(run: Stage1Run, m_steps: int, s_steps: int) -> None:
    """OUT/ as an OpenCLIP folder with its provenance; the robustness suite into eval.json."""
    accelerator, recipe, out = run.accelerator, run.recipe, run.out
    if accelerator.is_main_process:
        from open_clip_cxr_convert.export import export_folder
        from open_clip_cxr_train.towers import write_provenance
        export_folder(run.model, run.model_cfg, run.tokenizer, out, preprocess_cfg=run.preprocess_cfg)
        write_provenance(out, stage1_provenance(recipe, m_steps, s_steps))
        accelerator.print(f"exported {out} (load with open_clip.create_model_and_transforms('local-dir:{out}'))")
        if (recipe.get("eval") or {}).get("enabled", True):
            run.summary["eval"] = evaluate(run.tower, run.tokenizer, recipe, device=accelerator.device)
            (out / "eval.json").write_text(json.dumps(run.summary["eval"], indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ---------------------------------------------------------------- CLI

from open_clip_cxr_train.text_cli import add_arguments  # noqa: E402,F401  (the flags live there, free of torch: a fast --help)


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
