"""`open-clip-cxr demo`: the whole pipeline on real offline assets, on the CPU.

    open-clip-cxr demo --out runs/demo            (what `make demo` runs)

1. parse the real Open-I reports (read at run time from the installed torchxrayvision wheel);
2. stage 1: adapt the `cxr-llm-small-l2` text tower (MNTP, then supervised contrastive) on the
   train split -> OUT/stage1/, an OpenCLIP folder (`local-dir:OUT/stage1` loads it);
3. the text-robustness suite on the test split: adapted tower, unadapted tower,
   all-MiniLM-L6-v2 and a bag-of-words cosine, side by side;
4. shards from the real chest images that ship in packages, a short CLIP stage with the stage-1
   text tower (`text.from: local-dir:OUT/stage1`) and the ImageNet vision tower, retrieval recall
   on held-out images (tiny data: a smoke test, not a result);
5. export OUT/export/ (an OpenCLIP Hub folder with its model card), load it back through
   `open_clip.create_model_and_transforms('local-dir:...')` and compare embeddings;
6. print the results table; save it (results.md, results.json) with training curves (curves.png).

Every step reuses what an earlier run left (the converted LLM, stage 1, shards, the CLIP run)
unless `--fresh` is given; each is also a command of its own (`open-clip-cxr train-text`,
`shards`, `train-clip`, `eval`, `export`).
"""
import argparse
import csv
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Optional

from open_clip_cxr.asset_packages import package_dir
from open_clip_cxr.search.demo import index_and_query
from open_clip_cxr_train.demo_summary import Steps, plot_curves, summarise  # noqa: F401  (importable from here)

RECIPES = Path(__file__).parent / "recipes"
TEXT_RECIPE = RECIPES / "text-cxr-llm-small-cpu.yaml"
CLIP_RECIPE = RECIPES / "clip-cxr-llm-small-cpu.yaml"

# Stage-1 schedules: the CPU recipe as written, or its short variant.
SCHEDULES = {"recipe": TEXT_RECIPE, "short": RECIPES / "text-cxr-llm-small-cpu-short.yaml"}

# The package images have diagnosis labels, not reports: each gets a short report written from
# its label (our own wording). That is the "weak image data" the summary warns about.
LABEL_REPORTS = {
    "normal": "The lungs are clear. No focal consolidation, pleural effusion or pneumothorax. "
              "Normal cardiomediastinal silhouette.",
    "pneumonia": "Patchy airspace opacities consistent with bacterial pneumonia. No pleural effusion.",
    "adult": "PA view of the chest. Lungs are clear. Heart size is normal. No acute cardiopulmonary process.",
}


# ---------------------------------------------------------------- steps

def parse_reports() -> dict:
    from open_clip_cxr.data.registry import iter_reports
    skipped = []
    reports = list(iter_reports({"source": "openi"}, None, on_skip=skipped.append))
    splits = {}
    for r in reports:
        splits[r.split] = splits.get(r.split, 0) + 1
    info = {"reports": len(reports), "skipped_empty": len(skipped), "splits": splits,
            "with_findings": sum(bool(r.findings) for r in reports),
            "with_impression": sum(bool(r.impression) for r in reports)}
    print(json.dumps(info, indent=2))
    return info


def stage1(out: Path, schedule: str) -> dict:
    import torch
    from open_clip_cxr_train import text_stage
    from open_clip_cxr_train.recipe_check import resolve
    from open_clip_cxr_train.recipe_io import saved_differences
    folder = out / "stage1"
    recipe = resolve(str(SCHEDULES[schedule]), ["eval.enabled=false"], "text")   # step 3 evaluates
    recipe["output_dir"] = str(folder)
    recipe["train"]["num_threads"] = torch.get_num_threads()   # the demo has the machine to itself
    if (folder / "recipe.yaml").exists():
        diff = saved_differences(str(folder / "recipe.yaml"), recipe, stage="text")
        if diff:
            # an earlier demo (another schedule or version) trained it: keep it, aside, with the
            # CLIP run built on it, and train afresh
            for name in ("stage1", "clip"):
                if (out / name).exists():
                    n = 1 + sum(1 for _ in out.glob(f"{name}.previous-*"))
                    (out / name).rename(out / f"{name}.previous-{n}")
                    print(f"{out / name} was trained from another recipe ({', '.join(diff[:4])}): "
                          f"moved to {out / f'{name}.previous-{n}'}")
    if (folder / "open_clip_config.json").exists():
        print(f"reusing {folder} (delete it or pass --fresh to retrain)")
        return json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    return text_stage.train(recipe)


def robustness(out: Path, n_reports: Optional[int], schedule: str) -> dict:
    """The suite on the test split for four text encoders."""
    import open_clip
    import torch
    from open_clip_cxr.eval.robustness import (bow_encode_fn, format_table, hf_mean_pool_encode_fn, openi_reports,
                                               run_robustness)
    from open_clip_cxr.precision import choose as choose_precision
    from open_clip_cxr_train.recipe_check import resolve
    from open_clip_cxr_train.text_stage import FrozenCast, tower_encode_fn
    reports = openi_reports("test", limit=n_reports)
    print(f"{len(reports)} test-split reports")
    results = {}
    unadapted = resolve(str(SCHEDULES[schedule]), (), "text")["model"]

    def tower_fn(name):
        model = open_clip.create_model(name, pretrained_image=False).eval()
        tower = model.text.transformer.merge_lora()
        dtype = choose_precision("auto").dtype   # bf16 where measured faster (OPEN_CLIP_CXR_PRECISION forces)
        FrozenCast(tower, dtype)
        return tower_encode_fn(tower, open_clip.get_tokenizer(name), max_length=128, dtype=dtype)

    encoders = {
        "adapted (stage 1)": lambda: tower_fn(f"local-dir:{out / 'stage1'}"),
        f"unadapted {unadapted}": lambda: tower_fn(unadapted),
        "all-MiniLM-L6-v2": hf_mean_pool_encode_fn,
        "bag of words": bow_encode_fn,
    }
    for label, make in encoders.items():
        t = time.time()
        with torch.no_grad():
            results[label] = run_robustness(reports, make(), seed=0, progress=f"encoding ({label})")
        print(f"{label}: {time.time() - t:.0f}s", flush=True)
    table = format_table(results)
    print(table)
    return {"n_reports": len(reports), "results": results, "table": table}


def image_table(out: Path) -> Path:
    """A CSV (image, report, study, patient, split) over the chest images that ship in packages."""
    import pydicom.data
    rows = []
    folder = package_dir("pneumonia_model_package") / "datasets" / "pneumonia-data" / "val"
    for i, path in enumerate(sorted(folder.glob("*.jpeg"))):
        label = "normal" if "NORMAL" in path.name.upper() else "pneumonia"
        # two of each label held out, so retrieval is measured on images the model did not train on
        held_out = sum(1 for r in rows if r["label"] == label) < 2
        rows.append({"image": str(path), "report": LABEL_REPORTS[label], "study": path.stem,
                     "patient": path.stem, "split": "test" if held_out else "train", "label": label})
    rows.append({"image": pydicom.data.get_testdata_file("RG1_UNCR.dcm"), "report": LABEL_REPORTS["adult"],
                 "study": "RG1_UNCR", "patient": "RG1_UNCR", "split": "train", "label": "adult"})
    table = out / "images.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return table


def shards(out: Path) -> dict:
    from open_clip_cxr.data.sources import iter_table_source
    from open_clip_cxr.data.shard_writer import EncodeOptions, ShardLimits, format_summary, write_shards
    table = image_table(out)
    records = iter_table_source(table, study_col="study", patient_col="patient", split_col="split", source="pkg")
    manifest = write_shards(records, out / "shards", options=EncodeOptions(max_side=256, image_format="png"),
                            limits=ShardLimits(samples_per_shard=8), progress=True)
    print(format_summary(manifest, out / "shards"))
    return manifest


def clip_stage(out: Path, steps: int) -> dict:
    from open_clip_cxr.data.manifest import shard_urls
    from open_clip_cxr_train import clip_stage as cs
    from open_clip_cxr_train import common
    from open_clip_cxr_train.recipe_check import resolve
    from open_clip_cxr.data.manifest import load_manifest
    urls = {s: shard_urls(out / "shards", s) for s in ("train", "test")}
    n_train = sum(e["count"] for e in load_manifest(out / "shards")["shards"].values() if e["split"] == "train")
    recipe = resolve(str(CLIP_RECIPE), [f"train.max_steps={steps}"], "clip")
    # the adapted text tower from stage 1; the vision tower gets its ImageNet weights (the
    # stage-1 folder's was never trained), and the run's log says where each came from
    recipe["text"]["from"] = f"local-dir:{out / 'stage1'}"
    recipe["output_dir"] = str(out / "clip")
    recipe["data"].update(train=urls["train"], val=urls["test"], epoch_samples=n_train, batch_size=4)
    recipe["train"]["epochs"] = 1000   # stop by max_steps
    _move_aside_if_other_recipe(out, "clip", recipe)
    common.reset_accelerator_state()
    return cs.train(recipe)


def _move_aside_if_other_recipe(out: Path, name: str, recipe: dict, defaults: Optional[dict] = None) -> None:
    """A run folder of an earlier demo trained from another recipe (e.g. before `text.from`
    existed, when its vision tower started at random): keep it aside and train afresh.
    `recipe` is resolved (`recipe_check.resolve`); the saved one's gaps are filled as a resume would."""
    from open_clip_cxr_train.recipe_io import saved_differences
    diff = saved_differences(str(out / name / "recipe.yaml"), recipe, defaults)
    if diff:
        n = 1 + sum(1 for _ in out.glob(f"{name}.previous-*"))
        (out / name).rename(out / f"{name}.previous-{n}")
        print(f"{out / name} was trained from another recipe ({', '.join(diff[:4])}): moved to "
              f"{out / f'{name}.previous-{n}'}")


def export(out: Path, clip_metrics: dict, robustness_results: dict) -> dict:
    """The CLIP stage's folder, re-exported with a model card, then loaded back and compared."""
    import open_clip
    import torch
    from open_clip_cxr_convert.export import embeddings, export_folder, verify_export
    from open_clip_cxr_hub.card import render_card
    from open_clip_cxr_train import common
    src = Path(clip_metrics.get("export_dir") or out / "clip" / "export")
    name = f"local-dir:{src}"
    model, _, _ = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    images = torch.randn(2, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(0))
    reference = embeddings(model.eval(), tokenizer, images=images)
    model_cfg = json.loads((src / "open_clip_config.json").read_text())
    # recall_at_k layout, which the card reads; the dataset name is a short identifier (no report text)
    eval_results = {"package-images": {
        "image_to_text": {k.split("_", 1)[1]: v for k, v in clip_metrics.items() if k.startswith("val/i2t_")},
        "text_to_image": {k.split("_", 1)[1]: v for k, v in clip_metrics.items() if k.startswith("val/t2i_")}}}
    card = render_card(repo_id="open-clip-cxr/cxr-llm-small-l2-demo", model_cfg=model_cfg["model_cfg"],
                       preprocess_cfg=model_cfg.get("preprocess_cfg"), eval_results=eval_results,
                       recipe=common.load_recipe(str(CLIP_RECIPE)), license="apache-2.0")
    dest = out / "export"
    if dest.exists():
        shutil.rmtree(dest)
    export_folder(model, model_cfg["model_cfg"], tokenizer, dest, preprocess_cfg=model_cfg.get("preprocess_cfg"),
                  card=card)
    provenance = json.loads((src / "open_clip_config.json").read_text()).get("provenance")
    if provenance:   # where the towers' weights came from, carried into the release folder
        from open_clip_cxr_train.towers import write_provenance
        write_provenance(dest, provenance)
    diffs = verify_export(dest, reference)
    print(f"exported {dest}; reloaded through local-dir: max |diff| {diffs}")
    return {"folder": str(dest), "max_abs_diff": diffs}


# ---------------------------------------------------------------- CLI

def _threads_arg(value: str):
    if value == "auto" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: give a positive integer or auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="recipe",
                        help="stage-1 schedule: 'recipe' (the CPU recipe as written) or 'short' (fewer steps, "
                             "a smaller text cache)")
    parser.add_argument("--eval-reports", type=int, default=None,
                        help="first N test-split reports for the robustness suite (default: all)")
    parser.add_argument("--threads", default="auto", type=_threads_arg,
                        help="torch CPU threads (default auto: 1 vs every core, measured at start)")
    parser.add_argument("--clip-steps", type=int, default=12, help="CLIP-stage steps on the package images")
    parser.add_argument("--fresh", action="store_true", help="redo every step instead of reusing earlier outputs")


def schedule_hint(precision: str, schedule: str) -> Optional[str]:
    """One line where `auto` fell back to fp32 and the full schedule was asked for: name the quicker
    variant before the hour starts (the times: README, "`make demo`, run from a fresh clone")."""
    if precision != "fp32" or schedule != "recipe":
        return None
    return ("note: bf16 is not faster on this CPU, so the demo trains in fp32: 54 min on a 2-core AVX2-only CPU, "
            "7-13 min on one with fast bf16 (the step lines print the time left); "
            "`open-clip-cxr demo --schedule short` took 24 min there, for a weaker tower")


def run(args: argparse.Namespace) -> int:
    import torch
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    from open_clip_cxr.precision import choose, choose_threads
    choice = choose("auto")
    threads, why = choose_threads(args.threads, choice.precision)
    torch.set_num_threads(threads)
    print(f"{choice.line()}; threads {threads} ({why})", flush=True)
    hint = schedule_hint(choice.precision, args.schedule)
    if hint:
        print(hint, flush=True)
    step = Steps()
    results = {"schedule": args.schedule, "times": step.times,
               "hardware": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU, "
                           f"{choice.precision}, {threads} thread(s)"}
    with step("1. parse Open-I reports"):
        results["reports"] = parse_reports()
    with step("2. stage 1: adapt the text tower"):
        results["stage1"] = stage1(out, args.schedule)
    with step("3. text robustness (test split)"):
        results["robustness"] = robustness(out, args.eval_reports, args.schedule)
    with step("4a. shards from the package images"):
        results["shards"] = {k: v for k, v in shards(out).items() if k in ("totals", "skipped", "splits")}
    with step("4b. CLIP stage + retrieval"):
        results["clip"] = clip_stage(out, args.clip_steps)
    with step("5. export + reload"):
        results["export"] = export(out, results["clip"], results["robustness"])
    with step("6. summary"):
        results["curves"] = str(plot_curves(out))
    print("\n" + summarise(out, results, SCHEDULES[args.schedule].name))
    print(f"\nsaved {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    index_and_query(out)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
