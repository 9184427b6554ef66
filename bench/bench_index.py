"""The search index at scale, and `index` encoding throughput on real package films.

Part 1 (FAISS, as `open_clip_cxr.search.store` builds it): N unit vectors of dimension D
(default 1,000,000 x 512), for each index kind and vector store (fp32, fp16, int8): build
time, size on disk, peak resident memory, single-query latency p50/p99 (wall clock, and the
process's CPU time, which a busy shared machine inflates less), queries/s when all queries
come in one call, and recall@10 against exact fp32 search. The load average is recorded
next to each number. Each kind runs in its own interpreter, so its peak memory is its own; vectors are
generated and added 50,000 at a time, so nothing but the index itself holds all of them.
Two data sets: `uniform` (random unit vectors, the worst case for any approximate index:
no structure to exploit) and `clustered` (unit vectors around 2,000 random centres, closer to
real embeddings, which cluster by finding and view).

Part 2: `open-clip-cxr index` end to end (decode, preprocess, encode images and reports,
SQLite, FAISS) on the 17 real chest films that ship in packages (repeated to --films), per
precision, in images/s.

    nice python bench/bench_index.py                        # both parts, 1M x 512
    python bench/bench_index.py --part faiss --n 100000 --kinds flat,ivf
    python bench/bench_index.py --part encode --model cxr-llm-tiny --precisions fp32,bf16
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHUNK = 50_000
QUERIES_NPY = 1000     # npy data: the first rows (at most a fifth) are queries, never in the archive


def npy_queries(path: str) -> int:
    import numpy as np
    return min(QUERIES_NPY, len(np.load(path, mmap_mode="r")) // 5)


def load_avg() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def vectors(kind: str, n: int, dim: int, seed: int, start: int = 0):
    """Rows [start, start+n) of a data set, in chunks; the same rows whatever the chunking.

    `npy:PATH`: real embeddings from a float32 [N, D] file; seed 1 (queries) gives its first
    rows, seed 0 (the archive) the rest, so no query is in the archive.
    """
    import numpy as np
    if kind.startswith("npy:"):
        x = np.load(kind[4:], mmap_mode="r")
        nq = npy_queries(kind[4:])
        x = x[:min(n, nq)] if seed == 1 else x[nq:][:n]
        for s in range(0, len(x), CHUNK):
            y = np.array(x[s:s + CHUNK], dtype=np.float32)
            y /= np.linalg.norm(y, axis=1, keepdims=True)
            yield y
        return
    centres = None
    if kind == "clustered":
        centres = np.random.default_rng(1234).standard_normal((2000, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for s in range(start, start + n, CHUNK):
        m = min(CHUNK, start + n - s)
        rng = np.random.default_rng([seed, s])
        if centres is None:
            x = rng.standard_normal((m, dim), dtype=np.float32)
        else:
            x = centres[rng.integers(0, len(centres), m)] + 0.06 * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(kind: str, data: str, n: int, dim: int, nq: int, threads: int, params: dict, workdir: str,
          search_threads: int = 1, settings=None) -> dict:
    import faiss
    import numpy as np
    from open_clip_cxr.search import store
    base_mb = _rss_mb()          # the interpreter with numpy, faiss and torch (open_clip_cxr imports it)
    load_start = load_avg()
    kind, _, vstore = kind.partition(":")
    faiss.omp_set_num_threads(threads)
    build_threads = faiss.omp_get_max_threads()
    p = {**store.DEFAULT_PARAMS[kind], **params, "store": vstore or "fp32"}
    if kind in ("ivf", "ivfpq") and not p.get("nlist"):
        p["nlist"] = store.default_nlist(n)
    t0 = time.perf_counter()
    index = store.new_faiss(kind, dim, p)
    train_s = 0.0
    if not index.is_trained:   # as sync_faiss: a uniform sample of at most 100k rows (here the first 100k)
        sample = np.concatenate(list(vectors(data, min(n, 100_000), dim, seed=0)))
        index.train(sample)
        del sample
        train_s = time.perf_counter() - t0
    for x in vectors(data, n, dim, seed=0):
        index.add(x)
    build_s = time.perf_counter() - t0
    load_built = load_avg()
    path = Path(workdir) / f"{os.getpid()}.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    q = np.concatenate(list(vectors(data, nq, dim, seed=1)))
    nq = len(q)
    # one query at a time: on a busy machine OpenMP's second thread mostly waits (measured 5x slower)
    faiss.omp_set_num_threads(search_threads)
    single_threads = faiss.omp_get_max_threads()
    gt_path = Path(workdir) / f"{data.replace('/', '_')}-gt.npy"
    if settings is None:
        settings = [None]
        if kind == "hnsw":
            settings = [64, 128, 256, 512]
        elif kind in ("ivf", "ivfpq"):
            settings = [16, 32, 64, 128]
    rows = []
    for s in settings:
        if kind == "hnsw":
            index.hnsw.efSearch = s
        elif s is not None:
            faiss.extract_index_ivf(index).nprobe = s
        index.search(q[:5], 10)   # warm up
        lat, cpu, ids = [], [], []
        for i in range(nq):
            c, t = time.process_time(), time.perf_counter()
            _, I = index.search(q[i:i + 1], 10)
            lat.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            ids.append(I[0])
        ids = np.stack(ids)
        load_single = load_avg()
        if kind == "flat" and p["store"] == "fp32":
            np.save(gt_path, ids)      # exact fp32 search is the ground truth for every other row
            recall = 1.0
        else:
            gt = np.load(gt_path)
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt)]))
        # batched: all nq queries in one call (FAISS splits them over its threads; flat fp32 uses BLAS)
        batched = {}
        for bt in sorted({1, threads}):
            faiss.omp_set_num_threads(bt)
            t = time.perf_counter()
            _, I = index.search(q, 10)
            dt = time.perf_counter() - t
            batched[f"threads_{faiss.omp_get_max_threads()}"] = round(nq / dt, 1)
            assert (I == ids).mean() > 0.99 or kind == "hnsw", "a batched search disagrees with single queries"
        faiss.omp_set_num_threads(search_threads)
        lat = np.sort(np.asarray(lat) * 1000)
        cpu = np.asarray(cpu) * 1000
        rows.append({"setting": s, "p50_ms": round(float(np.percentile(lat, 50)), 3),
                     "p99_ms": round(float(np.percentile(lat, 99)), 3), "recall@10": round(recall, 4),
                     "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 3),
                     "batched_queries_per_s": batched, "load_avg_1_5_15": load_single})
    return {"kind": kind, "store": p["store"], "data": data, "n": n, "dim": dim,
            "params": {k: v for k, v in p.items() if v is not None},
            "train_s": round(train_s, 1), "build_s": round(build_s, 1), "size_mb": round(size / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_over_baseline_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb),
            "build_threads": build_threads, "search_threads": single_threads, "queries": nq,
            "load_avg_start": load_start, "load_avg_built": load_built, "search": rows}


def faiss_part(args, res: dict) -> list:
    workdir = tempfile.mkdtemp(prefix="bench_index_")
    top = res
    results = res.setdefault("faiss", [])
    try:
        settings = {}
        for part in (args.settings or "").split(";"):
            if part.strip():
                k, v = part.split("=")
                settings[k.strip()] = [int(x) for x in v.split(",")]
        for data in args.data.split(","):
            n = args.n
            if data.startswith("npy:"):
                import numpy as np
                arr = np.load(data[4:], mmap_mode="r")
                n, dim = min(n, len(arr) - npy_queries(data[4:])), arr.shape[1]
            else:
                dim = args.dim
            kinds = ["flat"] + [k for k in args.kinds.split(",") if k not in ("flat", "flat:fp32")]  # ground truth first
            for kind in kinds:
                st = settings.get(kind.partition(":")[0])
                code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r});"
                        f"from bench_index import child; print(json.dumps(child({kind!r}, {data!r}, {n}, {dim}, "
                        f"{args.queries}, {args.threads}, {{}}, {workdir!r}, {args.search_threads}, {st!r})))")
                t = time.time()
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{kind} on {data} failed")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(res)
                if args.json:      # after every kind, so a long run that is stopped keeps what it measured
                    Path(args.json).write_text(json.dumps(top, indent=2))
                print(f"[{data} n={n} {kind}] build {res['build_s']}s (train {res['train_s']}s, {res['build_threads']} "
                      f"FAISS threads), {res['size_mb']} MB on disk, peak RSS {res['peak_rss_mb']} MB "
                      f"({res['peak_over_baseline_mb']} MB over the bare interpreter); wall {time.time() - t:.0f}s; "
                      f"load avg {res['load_avg_start']} at start, {res['load_avg_built']} after build", flush=True)
                for r in res["search"]:
                    print(f"    setting {r['setting']}: single queries ({res['search_threads']} FAISS thread) "
                          f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms (CPU time p50 {r['cpu_p50_ms']} ms)  "
                          f"recall@10 {r['recall@10']}; "
                          f"{res['queries']} queries in one call: {r['batched_queries_per_s']} queries/s; "
                          f"load avg {r['load_avg_1_5_15']}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def encode_part(args) -> list:
    import csv

    import torch
    import open_clip_cxr
    from bench_common import real_images
    from open_clip_cxr.data.shard_writer import EncodeOptions, ShardLimits, write_shards
    from open_clip_cxr.data.sources import iter_table_source
    from open_clip_cxr.search.build import build_index, shard_sources
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_index_enc_"))
    results = []
    try:
        films = real_images()
        with open(work / "films.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "report", "study"])
            w.writeheader()
            for i in range(args.films):   # our own one-line reports; each film repeated under new study ids
                w.writerow({"image": str(films[i % len(films)]), "study": f"s{i}",
                            "report": f"Chest film {i}. The lungs are clear. No pleural effusion."})
        write_shards(iter_table_source(work / "films.csv", study_col="study"), work / "shards",
                     options=EncodeOptions(max_side=512), limits=ShardLimits(samples_per_shard=1000), progress=False)
        urls = "::".join(str(p) for p in sorted((work / "shards").glob("*.tar")))
        for precision in args.precisions.split(","):
            model, _, pre = open_clip_cxr.create_model_and_transforms(args.model, pretrained=args.pretrained,
                                                                      precision=precision)
            tok = open_clip_cxr.get_tokenizer(args.model)
            out = work / f"index-{precision}"
            t = time.perf_counter()
            m = build_index(out, shard_sources(urls), model=model.eval(), preprocess=pre, tokenizer=tok,
                            model_name=args.model, pretrained=args.pretrained, precision=precision,
                            batch_size=args.batch_size, progress=False, log=lambda s: None)
            dt = time.perf_counter() - t
            n = m["counts"]["images"]
            results.append({"model": args.model, "precision": precision, "images": n, "seconds": round(dt, 1),
                            "images_per_s": round(n / dt, 2), "threads": args.threads})
            print(f"[encode {args.model} {precision}] {n} films (+{m['counts']['studies']} reports) in {dt:.1f}s: "
                  f"{n / dt:.2f} images/s", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def real_embed_part(args) -> list:
    """Real embeddings to run the FAISS part on (`--data npy:PATH`); written outside the repository.

    - openi-minilm.npy: the unique sentences of the Open-I reports (read at run time from the
      torchxrayvision wheel; never committed) through all-MiniLM-L6-v2, mean-pooled, D=384.
    - films-tiny.npy: the films of --films-dir (PNG) and the package films through the random
      `cxr-llm-tiny` image tower, D=512: the embeddings the tests and `make demo`'s index step make.
    """
    import numpy as np
    import torch
    from open_clip_cxr.eval.robustness import hf_mean_pool_encode_fn
    from open_clip_cxr.reports.parsers import iter_openi_tgz
    torch.set_num_threads(args.threads)
    out = Path(args.real_out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sentences, seen = [], set()
    for rep in iter_openi_tgz(on_error=lambda e: None):
        text = " ".join(str(getattr(rep, f, "") or "") for f in ("findings", "impression")) or str(rep.text)
        for sent in text.replace("\n", " ").split(". "):
            sent = " ".join(sent.split()).strip(" .")
            if len(sent) > 12 and sent.lower() not in seen and "xxxx" not in sent.lower():
                seen.add(sent.lower())
                sentences.append(sent)
    rng = np.random.default_rng(0)
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]   # queries: a random 1000
    t = time.perf_counter()
    emb = hf_mean_pool_encode_fn()(sentences).numpy().astype(np.float32)
    np.save(out / "openi-minilm.npy", emb)
    written.append({"file": str(out / "openi-minilm.npy"), "rows": len(emb), "dim": emb.shape[1],
                    "seconds": round(time.perf_counter() - t, 1)})
    import open_clip_cxr
    from bench_common import real_images
    from open_clip_cxr.vision.io import load_image
    torch.manual_seed(0)
    model, _, pre = open_clip_cxr.create_model_and_transforms("cxr-llm-tiny")
    model.eval()
    films = real_images(args.films_dir)
    films = [films[i] for i in rng.permutation(len(films))]
    vecs = []
    with torch.no_grad():
        for s in range(0, len(films), 32):
            x = torch.stack([pre(load_image(str(f), mode="L")) for f in films[s:s + 32]])
            vecs.append(model.encode_image(x, normalize=True).float().numpy())
    emb = np.concatenate(vecs)
    np.save(out / "films-tiny.npy", emb)
    written.append({"file": str(out / "films-tiny.npy"), "rows": len(emb), "dim": emb.shape[1]})
    for w in written:
        print(f"[real] wrote {w}", flush=True)
    return written


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "faiss", "encode", "real-embed"], default="all")
    p.add_argument("--real-out", default="/tmp/bench_index_real", help="real-embed: where the .npy files go")
    p.add_argument("--films-dir", default=None, help="real-embed: a folder of extra PNG films")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=300, help="single queries timed per setting")
    p.add_argument("--kinds", default="flat,flat:fp16,flat:int8,ivf,hnsw",
                   help="KIND[:STORE] list (stores fp32, fp16, int8); exact flat fp32 always runs first")
    p.add_argument("--data", default="clustered,uniform",
                   help="clustered, uniform, or npy:PATH (real embeddings; the first 1000 rows are the queries)")
    p.add_argument("--settings", default=None,
                   help="search settings per kind, e.g. 'ivf=8,16,32;hnsw=64,128' (nprobe / efSearch)")
    p.add_argument("--threads", type=int, default=2, help="threads for building and encoding")
    p.add_argument("--search-threads", type=int, default=1, help="FAISS threads for single queries")
    p.add_argument("--model", default="cxr-llm-tiny")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--films", type=int, default=68, help="films to index (the 17 package films, repeated)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}; {args.threads} threads; shared with other jobs while measured "
          f"(load avg {load_avg()} at start)", flush=True)
    res = {"cpu": cpu_name(), "threads": args.threads, "load_avg_start": load_avg()}
    if args.part in ("all", "faiss"):
        faiss_part(args, res)
    if args.part in ("all", "encode"):
        res["encode"] = encode_part(args)
    if args.part == "real-embed":
        res["real"] = real_embed_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
