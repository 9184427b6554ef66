"""Export a stage-1 run that has not finished (or was stopped) from its checkpoints, as the run's
own export would: the MNTP adapter merged into the decoder, the pooler and output norm from the
latest (or a named) contrastive checkpoint, `provenance` saying how many steps it had.

    python bench/export_stage1_checkpoint.py --run runs/stage1 --out runs/stage1-at-step-N

For a measurement on a machine too busy to finish the recipe: the folder is what `train-text`
would have exported had the recipe asked for that many contrastive steps, except that the
learning-rate schedule was the full run's (cosine over all its steps, cut where it stopped).
Only the cached / pooler-only contrastive setting (`supcon.lora: null`) is handled.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the stage-1 output folder (with recipe.yaml and work/)")
    p.add_argument("--out", required=True, help="folder to export to (must not exist)")
    p.add_argument("--checkpoint", default=None, help="a work/supcon/checkpoints/checkpoint-N folder (default: latest)")
    args = p.parse_args(argv)
    import torch
    from safetensors.torch import load_file
    from open_clip_cxr_convert.export import export_folder
    from open_clip_cxr.text.lora import load_adapter_state_dict
    from open_clip_cxr_train import common
    from open_clip_cxr_train.mntp import LORA_TARGETS
    from open_clip_cxr_train.text_stage import build_model, set_lora, stage1_provenance
    from open_clip_cxr_train.towers import write_provenance

    run, out = Path(args.run), Path(args.out)
    if out.exists():
        print(f"--out {out} exists: give a new folder", file=sys.stderr)
        return 2
    recipe = common.load_recipe(str(run / "recipe.yaml"))
    if (recipe.get("supcon") or {}).get("lora"):
        print("this run trains LoRA in the contrastive stage: only pooler-only runs are handled", file=sys.stderr)
        return 2
    ckpts = sorted((run / "work" / "supcon" / "checkpoints").glob("checkpoint-*"),
                   key=lambda c: int(c.name.rsplit("-", 1)[1]))
    ckpt = Path(args.checkpoint) if args.checkpoint else (ckpts[-1] if ckpts else None)
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        print(f"{run}: no contrastive checkpoint under work/supcon/checkpoints", file=sys.stderr)
        return 2
    model, tokenizer, model_cfg, preprocess_cfg = build_model(recipe.get("model", "cxr-llm-small"),
                                                              recipe.get("text_arch"))
    tower = model.text.transformer
    mcfg = recipe.get("mntp") or {}
    m_steps = int(mcfg.get("steps", 0))
    if m_steps:
        set_lora(tower, {**mcfg.get("lora", {}), "target_modules": mcfg.get("lora", {}).get("target_modules", LORA_TARGETS)})
        adapter = torch.load(run / "work" / "mntp" / "adapter.pt", map_location="cpu", weights_only=True)
        load_adapter_state_dict(tower.llm, adapter)
        set_lora(tower, None)
    state = {k[len("tower."):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    missing = set(state) - set(tower.state_dict())
    if missing:
        print(f"{ckpt}: keys the tower lacks: {sorted(missing)[:5]}", file=sys.stderr)
        return 2
    tower.load_state_dict(state, strict=False)
    step = int(re.search(r"(\d+)$", ckpt.name).group(1)) - m_steps   # checkpoints count MNTP steps too
    export_folder(model, model_cfg, tokenizer, out, preprocess_cfg=preprocess_cfg)
    prov = stage1_provenance(recipe, m_steps, step)
    prov["text"]["by"] += f" (exported from {ckpt.name} of a {recipe['supcon']['steps']}-step run)"
    write_provenance(out, prov)
    print(f"exported {out}: MNTP {m_steps} steps + {step} of {recipe['supcon']['steps']} contrastive steps "
          f"({len(state)} pooler/norm tensors from {ckpt})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
