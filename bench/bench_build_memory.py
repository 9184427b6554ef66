"""Peak memory of building the paper's `cxr-llm` (random weights, offline) in bf16.

Each way is built in a fresh interpreter so its peak resident memory is its own:
- OpenCLIP's `create_model(precision="bf16")`: builds fp32, then casts;
- ours, `open_clip_cxr.create_model(precision="bf16")`: builds straight in bf16.
One bf16 copy of the weights is ~3.0 GB, one fp32 copy ~6.0 GB.

    python bench/bench_build_memory.py
"""
from bench_common import run_isolated, table

CODE = """
import json, resource, time, torch, open_clip, open_clip_cxr
t = time.time()
model = {factory}.create_model("cxr-llm", precision="bf16", pretrained_text=False, pretrained_image=False)
n = sum(p.numel() for p in model.parameters())
bytes_ = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({{"params": n, "weights_gb": bytes_ / 2**30, "seconds": time.time() - t,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""
BASE = """
import json, resource, torch, open_clip, open_clip_cxr
print(json.dumps({"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main():
    base = run_isolated(BASE)["peak_gb"]
    rows = []
    for label, factory in [("open_clip.create_model (fp32 build, then cast)", "open_clip"),
                           ("open_clip_cxr.create_model (built in bf16)", "open_clip_cxr")]:
        r = run_isolated(CODE.format(factory=factory))
        rows.append([label, f"{r['params'] / 1e9:.3f}B", f"{r['weights_gb']:.2f}", f"{r['peak_gb']:.2f}",
                     f"{r['peak_gb'] - base:.2f}", f"{r['seconds']:.0f}"])
    print(f"cxr-llm in bf16; interpreter + imports alone peak at {base:.2f} GB")
    print(table(rows, ["build", "params", "weights GB", "peak RSS GB", "peak - imports GB", "s"]))


if __name__ == "__main__":
    main()
