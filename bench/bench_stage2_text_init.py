"""The paper's comparison on real image-note pairs: the CLIP stage started from the unadapted
text tower vs from the stage-1 (adapted) one, same recipe, several seeds.

    python bench/bench_stage2_text_init.py --data /path/to/covid_cxr_notes --stage1 runs/stage1 \
        --work runs/bench-stage2 --seeds 0 1 2

Data: a folder with `studies.jsonl` (one image per line: uid, patient_id, images[0].file under
images/, text, split train/val/test; the split is by patient) such as the COVID-19 image-note
collection. Nothing of it is copied into the repository: shards, runs and results go under
--work.

Both arms: `cxr-llm-small-l4`'s architecture and the CPU CLIP recipe
(`training/recipes/clip-cxr-llm-small-cpu.yaml`), run for --epochs epochs (default 4, bf16
autocast: what two shared CPU cores allow) in cached-text mode
(the frozen text tower encodes each note once; the text head and the whole vision tower train),
with the ImageNet vision weights (`pretrained_image: true`; each run's log line and the table
say where both towers' weights came from). They differ only in `text.from`: null (the
unadapted SmolLM2 layers and a random pooler) or `local-dir:<stage1>` (the adapted tower).
Each trained model is evaluated with `open-clip-cxr eval --task retrieval --match both` on the
val and test splits: recall@1/5/10 in both directions, at study level (the item's own note)
and text level (any item whose note reads the same), beside the same recall for random
embeddings (chance, averaged over 200 draws).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPLITS = {"train": "train", "val": "validate", "test": "test"}
LEVELS = ("study", "text")
DIRS = ("image_to_text", "text_to_image")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def write_table(data: Path, work: Path) -> Path:
    """studies.jsonl -> a table for `--source table` (absolute image paths; split names as given)."""
    rows = []
    for line in (data / "studies.jsonl").read_text().splitlines():
        r = json.loads(line)
        if not r.get("images") or not (r.get("text") or "").strip():
            continue
        rows.append({"image": str((data / "images" / r["images"][0]["file"]).resolve()), "report": r["text"],
                     "study": r["uid"], "patient": str(r["patient_id"]), "split": SPLITS[r["split"]]})
    table = work / "table.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return table


def make_shards(data: Path, work: Path) -> dict:
    from open_clip_cxr.data.manifest import load_manifest, shard_urls
    from open_clip_cxr.data.shard_writer import EncodeOptions, ShardLimits, write_shards
    from open_clip_cxr.data.sources import iter_table_source
    out = work / "shards"
    if load_manifest(out) is None:
        table = write_table(data, work)
        records = iter_table_source(table, study_col="study", patient_col="patient", split_col="split",
                                    source="covid-notes")
        write_shards(records, out, options=EncodeOptions(max_side=256, image_format="png"),
                     limits=ShardLimits(samples_per_shard=128), progress=False)
    manifest = load_manifest(out)
    counts = {}
    for e in manifest["shards"].values():
        counts[e["split"]] = counts.get(e["split"], 0) + e["count"]
    return {"urls": {s: "::".join(shard_urls(out, s)) for s in counts}, "counts": counts}


def train_arm(arm: str, text_from, seed: int, shards: dict, args) -> dict:
    from open_clip_cxr_train import clip_stage, common
    out = Path(args.work) / "runs" / f"{arm}-seed{seed}"
    done = out / "final_metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    recipe = common.load_recipe(str(ROOT / "training/recipes/clip-cxr-llm-small-cpu.yaml"))
    recipe.update(model=args.model, output_dir=str(out), seed=seed, pretrained_image=True)
    recipe["text"].update({"from": text_from, "cached": True, "cache_dir": str(Path(args.work) / "text-cache" / arm)})
    recipe["data"].update(train=shards["urls"]["train"], val=None, epoch_samples=shards["counts"]["train"])
    recipe["train"].update(max_steps=None, epochs=args.epochs, num_threads=args.threads, log_with=None,
                           mixed_precision=args.mixed_precision,
                           log_every=25, checkpoint_every=10_000)
    common.reset_accelerator_state()
    t = time.time()
    final = clip_stage.train(recipe)
    final["train_s"] = round(time.time() - t, 1)
    done.write_text(json.dumps(final, indent=2))
    return final


def evaluate(export_dir: str, split: str, shards: dict, out: Path) -> dict:
    """`open-clip-cxr eval --task retrieval --match both` on one split (the CLI a user runs)."""
    from open_clip_cxr.cli import main
    res_path = out / "results.json"
    if not res_path.exists():
        rc = main(["eval", "--task", "retrieval", "--model", f"local-dir:{export_dir}", "--shards",
                   shards["urls"][split], "--out", str(out), "--match", "both", "--batch-size", "32"])
        if rc != 0:
            raise SystemExit(f"eval failed on {split}")
    return json.loads(res_path.read_text())["results"]


def chance(shards: dict, split: str, draws: int = 200) -> dict:
    """Recall of random embeddings on the split's real study ids and notes (mean of `draws`)."""
    import torch
    from open_clip_cxr.eval.retrieval import recall_by_match
    from open_clip_cxr.data.loader import SampleSource
    studies, texts = [], {}
    for key, study, _, text, _ in SampleSource(shards["urls"][split], preprocess=lambda im: torch.zeros(1)):
        studies.append(str(study))
        texts.setdefault(str(study), text)
    t_ids = list(texts)
    g = torch.Generator().manual_seed(0)
    acc = {}
    for _ in range(draws):
        img = torch.nn.functional.normalize(torch.randn(len(studies), 16, generator=g), dim=-1)
        txt = torch.nn.functional.normalize(torch.randn(len(t_ids), 16, generator=g), dim=-1)
        r = recall_by_match(img, studies, txt, t_ids, [texts[s] for s in t_ids], match="both")
        for level in LEVELS:
            for d in DIRS:
                for k, v in r["by_match"][level][d].items():
                    acc[(level, d, k)] = acc.get((level, d, k), 0.0) + v / draws
    out = {level: {d: {k: acc[(level, d, k)] for (lv, dd, k) in acc if lv == level and dd == d} for d in DIRS}
           for level in LEVELS}
    for level in LEVELS:
        vals = [v for d in DIRS for v in out[level][d].values()]
        out[level]["mean_recall"] = sum(vals) / len(vals)
    return out


def row(level_res: dict) -> list:
    cells = [level_res[d][f"R@{k}"] for d in DIRS for k in (1, 5, 10)]
    return cells + [level_res["mean_recall"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with studies.jsonl and images/")
    p.add_argument("--stage1", default=None, help="the stage-1 export (adapted text tower), an OpenCLIP folder")
    p.add_argument("--work", default="runs/bench-stage2", help="shards, runs and results go here")
    p.add_argument("--model", default="cxr-llm-small-l4", help="architecture (vision tower) and the unadapted text tower")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16"],
                   help="the recipe's train.mixed_precision (bf16 autocast: ~1.35x faster on a CPU with bf16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary", action="store_true", help="train nothing: print the tables of the runs under --work")
    p.add_argument("--arms", nargs="+", default=["unadapted", "adapted"], choices=["unadapted", "adapted"])
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data, work = Path(args.data), Path(args.work)
    if not (data / "studies.jsonl").is_file():
        print(f"--data {data}: no studies.jsonl there; give the image-note folder", file=sys.stderr)
        return 2
    if "adapted" in args.arms and not args.summary and not (Path(args.stage1 or "") / "open_clip_config.json").is_file():
        print(f"--stage1 {args.stage1}: not an exported folder (no open_clip_config.json); run train-text first",
              file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(data, work)
    print(f"items per split: {shards['counts']}  (CPU: {cpu_name()}, torch threads {args.threads})", flush=True)
    sources = {"unadapted": None, "adapted": f"local-dir:{Path(args.stage1).resolve()}" if args.stage1 else None}
    results = {"cpu": cpu_name(), "counts": shards["counts"], "epochs": args.epochs, "model": args.model,
               "mixed_precision": args.mixed_precision,
               "stage1": str(args.stage1), "runs": {}, "chance": {}}
    for split in ("validate", "test"):
        results["chance"][split] = chance(shards, split)
    for seed in ([] if args.summary else args.seeds):
        for arm in args.arms:
            final = train_arm(arm, sources[arm], seed, shards, args)
            print(f"{arm} seed {seed}: trained {final.get('train_s', '?')} s; text tower: {final['weights']['text']}; "
                  f"vision tower: {final['weights']['vision']}", flush=True)
            for split in ("validate", "test"):
                evaluate(final["export_dir"], split, shards, work / "eval" / f"{arm}-seed{seed}" / split)
    # every finished run under --work (other processes may have trained some of them)
    for done in sorted((work / "runs").glob("*-seed*/final_metrics.json")):
        name = done.parent.name
        final = json.loads(done.read_text())
        paths = {split: work / "eval" / name / split / "results.json" for split in ("validate", "test")}
        if not all(p.exists() for p in paths.values()):
            continue
        ev = {split: json.loads(p.read_text())["results"] for split, p in paths.items()}
        arm, seed = name.rsplit("-seed", 1)
        results["runs"][name] = {"arm": arm, "seed": int(seed), "weights": final["weights"],
                                 "train_s": final.get("train_s"), "eval": ev,
                                 "n_distinct_reports": {s: ev[s]["n_distinct_reports"] for s in ev}}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if not results["runs"]:
        print("no finished runs yet")
        return 0

    from bench_common import print_table
    header = ["run", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "mean"]
    for split in ("validate", "test"):
        for level in LEVELS:
            rows, by_arm = [], {}
            for name, r in results["runs"].items():
                cells = row(r["eval"][split]["by_match"][level])
                by_arm.setdefault(r["arm"], []).append(cells)
                rows.append([name] + [f"{c:.3f}" for c in cells])
            for arm, runs in by_arm.items():
                means = [statistics.mean(c) for c in zip(*runs)]
                sds = [statistics.stdev(c) if len(runs) > 1 else 0.0 for c in zip(*runs)]
                rows.append([f"{arm} mean of {len(runs)} (sd)"] + [f"{m:.3f} ({s:.3f})" for m, s in zip(means, sds)])
            rows.append(["random embeddings"] + [f"{c:.3f}" for c in row(results["chance"][split][level])])
            n = next(iter(results["runs"].values()))["eval"][split]
            print_table(f"{split} split, {level}-level match ({n['n_images']} images, {n['n_reports']} notes, "
                        f"{n['n_distinct_reports']} distinct); CPU {results['cpu']}", header, rows)
    print(f"\nwrote {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
