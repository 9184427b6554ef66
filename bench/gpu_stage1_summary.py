"""One row per run of a `bench/gpu_stage1.sh` folder: the held-out protocol's headline rows.

    python bench/gpu_stage1_summary.py RESULTS_DIR [NAME ...]   (NAME.bench.json + NAME.wall per run)
"""
import json
import sys
from pathlib import Path

COLUMNS = ("run", "heldout_mean", "hospital_mix", "caps_headers", "numbered_list", "telegraphic",
           "heldout_discr", "negation", "laterality", "insertion", "in_dist_mean", "in_dist_discr", "wall_s")


def row(bench: Path) -> list:
    data = json.loads(bench.read_text())
    name = bench.name[:-len(".bench.json")]
    wall = bench.with_name(f"{name}.wall")
    out = [name]
    for protocol in ("heldout", "train"):
        # keys: split:limit:seed:protocol:texts-hash (`bench_text_stage.py`); the latest written wins
        store = [v for k, v in data.items() if k.split(":")[3:4] == [protocol]][-1]
        res = next(iter(store.values()))          # the one --after column
        discr = res["error_discrimination"]
        if protocol == "heldout":
            styles, types = res["variant_to_original"], discr["per_error_type"]
            out += [res["variant_to_original_mean_R@1"]] + \
                [styles[s]["R@1"] for s in ("hospital_mix", "caps_headers", "numbered_list", "telegraphic_impression")] + \
                [discr["accuracy"]] + [types[t]["accuracy"] for t in ("negation", "laterality", "insertion")]
        else:
            out += [res["variant_to_original_mean_R@1"], discr["accuracy"]]
    return out + [wall.read_text().strip() if wall.exists() else "-"]


def main():
    folder, names = Path(sys.argv[1]), sys.argv[2:]
    print("\t".join(COLUMNS))
    benches = [folder / f"{n}.bench.json" for n in names] if names else sorted(folder.glob("*.bench.json"))
    for bench in benches:
        try:
            print("\t".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row(bench)))
        except (OSError, KeyError, IndexError, StopIteration, ValueError) as e:
            print(f"{bench.name}: unreadable ({e!r})")


if __name__ == "__main__":
    main()
