"""The demo's bookkeeping: each step timed, the training curves, the results table."""
import json
import time
from pathlib import Path


class Steps:
    """Prints each step with its wall time; collects the timings for the summary."""

    def __init__(self):
        self.times = {}

    def __call__(self, name):
        steps = self

        class _Step:
            def __enter__(self):
                self.t = time.time()
                print(f"\n=== {name} ===", flush=True)

            def __exit__(self, *exc):
                steps.times[name] = round(time.time() - self.t, 1)
                print(f"--- {name}: {steps.times[name]:.0f}s", flush=True)
        return _Step()


def plot_curves(out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, path) in zip(axes, [("stage 1: text tower", out / "stage1" / "metrics.jsonl"),
                                       ("stage 2: CLIP", out / "clip" / "metrics.jsonl")]):
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        for stage in sorted({r.get("stage", "clip") for r in rows}):
            pts = [(r["step"], r["loss"]) for r in rows if r.get("stage", "clip") == stage and "loss" in r]
            if pts:
                ax.plot(*zip(*pts), label=stage)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    png = out / "curves.png"
    fig.savefig(png, dpi=110)
    return png


def summarise(out: Path, results: dict, recipe_name: str) -> str:
    """results.md and results.json; `recipe_name`: the stage-1 recipe file the schedule used."""
    lines = [f"# open_clip_cxr demo ({results['hardware']})", "",
             f"Stage-1 schedule: **{results['schedule']}** "
             f"(recipe `training/recipes/{recipe_name}`: "
             f"{results.get('stage1', {}).get('mntp_steps', '?')} MNTP steps, "
             f"{results.get('stage1', {}).get('supcon_steps', '?')} contrastive steps).", ""]
    rob = results.get("robustness")
    if rob:
        lines += [f"## Text robustness, Open-I test split ({rob['n_reports']} reports)", "", "```", rob["table"], "```", ""]
    clip = results.get("clip") or {}
    lines += ["## CLIP stage on the package images (a smoke test, not a result)", "",
              "17 real chest X-rays ship in packages (16 paediatric JPEGs, 8 normal / 8 bacterial pneumonia, and",
              "one adult PA DICOM); they have labels, not reports, so each gets a one-line report written from",
              "its label. 13 train, 4 held out: retrieval among 4 items and 2 distinct reports says only that the",
              "pipeline runs end to end, nothing about retrieval quality.", ""]
    recall = {k: v for k, v in clip.items() if "R@" in k}
    lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(recall.items())]
    lines += [f"- final loss: {clip.get('loss', 'n/a')}"]
    lines += [f"- {tower} tower weights: {origin}" for tower, origin in (clip.get("weights") or {}).items()] + [""]
    exp = results.get("export") or {}
    if exp:
        lines += ["## Export", "", f"{exp['folder']} reloaded through `local-dir:`; max |diff| of the embeddings: "
                  f"{exp['max_abs_diff']}", ""]
    lines += ["## Wall time per step (s)", ""] + [f"- {k}: {v}" for k, v in results["times"].items()]
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items()}, indent=2, default=str))
    return text
