"""Chunked retrieval at scale: wall time and peak memory of top-k + ranks of true matches.

Default: 100,000 queries x 100,000 gallery items of dim 768 on the CPU, where a float32
score matrix would need 40 GB. Each configuration runs in its own interpreter, so its peak
resident memory (ru_maxrss) is its own; "search peak" is that peak minus the resident size
once the embeddings exist, i.e. what the search itself added.

    python bench/bench_retrieval.py                       # 100k x 100k, float32 and float16 storage
    python bench/bench_retrieval.py --sizes 20000x20000 --dtypes float32 --threads 2
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def child(nq, ng, dim, dtype, chunk, gchunk, k, noise, threads, seed=0):
    import importlib.util
    import torch
    # load the module by path: importing the package would also load the plugin (open_clip,
    # transformers, ...), ~1 GB of RSS that has nothing to do with the search
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "open_clip_cxr", "eval", "retrieval.py")
    spec = importlib.util.spec_from_file_location("cxr_retrieval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rank_of_targets = mod.rank_of_targets
    if threads:
        torch.set_num_threads(threads)
    storage = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    n = max(nq, ng)
    queries = torch.empty(nq, dim, dtype=storage)
    gallery = torch.empty(ng, dim, dtype=storage)
    step = 8192   # fill in slices: no full-size float32 temporary for the float16 runs
    for s in range(0, n, step):
        e = min(s + step, n)
        base = torch.nn.functional.normalize(torch.randn(e - s, dim, generator=g), dim=-1)
        if s < nq:
            queries[s:min(e, nq)] = base[: min(e, nq) - s].to(storage)
        if s < ng:
            # gallery i is a noisy copy of query i: its true match, cosine ~ 1/sqrt(1+noise^2)
            noisy = base + noise * torch.randn(e - s, dim, generator=g) / dim ** 0.5
            gallery[s:min(e, ng)] = torch.nn.functional.normalize(noisy, dim=-1)[: min(e, ng) - s].to(storage)
    ids = list(range(n))
    rss_data = _rss_mb()
    peak_before = _peak_mb()
    t, c = time.perf_counter(), time.process_time()
    res = rank_of_targets(queries, gallery, ids[:nq], ids[:ng], k=k, chunk_size=chunk, gallery_chunk_size=gchunk)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    ranked = res.ranks[res.ranks >= 0]
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_data_mb": rss_data, "peak_mb": _peak_mb(), "peak_before_mb": peak_before,
                      "r1": float((ranked < 1).float().mean()), "r10": float((ranked < 10).float().mean()),
                      "threads": torch.get_num_threads()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000x100000", help="comma list of QUERIESxGALLERY")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtypes", default="float32,float16", help="storage dtypes (scores are float32)")
    ap.add_argument("--chunk-size", type=int, default=1024, help="queries per block")
    ap.add_argument("--gallery-chunk-size", type=int, default=8192, help="gallery items per block")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--noise", type=float, default=6.0, help="noise of the true pairs (6: R@1 well below 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", nargs=10, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        nq, ng, dim, dtype, cs, gcs, k, noise, threads, seed = a.child
        child(int(nq), int(ng), int(dim), dtype, int(cs), int(gcs), int(k), float(noise), int(threads), int(seed))
        return
    rows = []
    for size in a.sizes.split(","):
        nq, ng = (int(x) for x in size.lower().split("x"))
        for dtype in a.dtypes.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(nq), str(ng), str(a.dim), dtype,
                   str(a.chunk_size), str(a.gallery_chunk_size), str(a.k), str(a.noise), str(a.threads), "0"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"child failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            full_gb = nq * ng * 4 / 1e9
            gflop = 2 * nq * ng * a.dim / 1e9
            rows.append([f"{nq}x{ng}", a.dim, dtype, f"{a.chunk_size}x{a.gallery_chunk_size}", r["threads"],
                         f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{gflop / r['wall_s']:.0f}", f"{r['rss_data_mb']:.0f}",
                         f"{r['peak_mb']:.0f}", f"{r['peak_mb'] - r['rss_data_mb']:.0f}", f"{full_gb:.1f}",
                         f"{r['r1']:.3f}", f"{r['r10']:.3f}"])
            print(f"done {rows[-1]}", file=sys.stderr, flush=True)
    headers = ["queries x gallery", "dim", "storage", "block", "threads", "wall s", "CPU s", "GFLOP/s", "RSS data MB",
               "peak RSS MB", "search peak MB", "full fp32 matrix GB", "R@1", "R@10"]
    widths = [max(len(h), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    print("\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]))


if __name__ == "__main__":
    main()
