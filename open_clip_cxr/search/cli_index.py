"""`open-clip-cxr index`: encode an archive (shards, or a dataset layout / CSV) into a searchable index folder."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  open-clip-cxr index --model cxr-llm-small --pretrained ckpt.pt \\
      --shards 'shards/test-{000000..000009}.tar' --out runs/index
  open-clip-cxr index --model local-dir:export/ --source table --table archive.csv \\
      --study-col study --patient-col patient --out runs/index
  open-clip-cxr index --model local-dir:export/ --shards 'new/test-{000000..000001}.tar' --out runs/index --add

Rerunning an interrupted command resumes it: committed chunks are not encoded again.
--add appends sources that the index lacks; the model must be the one the index was built
with (checked by name, config hash and probe embeddings). Exact inner-product search by
default; --store fp16 halves the bytes each query scans (int8 quarters them);
--index-kind hnsw / ivf / ivfpq for archives past a few million images."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="OpenCLIP model: a name, 'local-dir:PATH' or 'hf-hub:ORG/REPO'")
    m.add_argument("--pretrained", default=None, help="checkpoint file or pretrained tag")
    m.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "pure_bf16", "pure_fp16"],
                   help="model precision while encoding (default fp32)")
    m.add_argument("--device", default="cpu", help="torch device (default cpu)")
    m.add_argument("--batch-size", type=int, default=64, help="images or reports per forward pass (default 64)")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--workers", type=int, default=1,
                   help="threads that decode and preprocess images while one reader walks the shards (default 1)")
    s = p.add_argument_group("input (one of)")
    s.add_argument("--shards", action="append", help="WebDataset shards (brace pattern; repeat or join with '::')")
    s.add_argument("--source", choices=["mimic-cxr", "chexpert-plus", "openi", "table"],
                   help="a dataset layout, read as `open-clip-cxr shards` reads it")
    s.add_argument("--table", help="--source table / chexpert-plus: the csv or jsonl")
    s.add_argument("--root", help="image folder (dataset root for mimic-cxr)")
    s.add_argument("--reports", help="mimic-cxr reports folder, or the Open-I tgz / XML folder")
    s.add_argument("--views", help="keep only these view positions, comma-separated")
    c = p.add_argument_group("table columns (--source table)")
    for col, default in (("image", "image"), ("report", "report"), ("findings", None), ("impression", None),
                         ("study", None), ("patient", None), ("split", None)):
        c.add_argument(f"--{col}-col", default=default, help=f"{col} column" + (f" (default {default})" if default else ""))
    o = p.add_argument_group("index")
    o.add_argument("--out", required=True, metavar="DIR", help="index folder")
    o.add_argument("--add", action="store_true", help="append sources this index does not have yet")
    o.add_argument("--overwrite", action="store_true", help="delete an existing index in DIR and start again")
    o.add_argument("--index-kind", choices=["flat", "hnsw", "ivf", "ivfpq"], default=None,
                   help="flat: exact (default); hnsw / ivf / ivfpq: approximate, for millions of images")
    o.add_argument("--store", default=None, metavar="fp32|fp16|int8",
                   help="how vectors are kept (flat, ivf, hnsw): fp32 exact (default), fp16 half the bytes, "
                        "int8 a quarter (approximate scores)")
    o.add_argument("--nlist", type=int, default=None, help="ivf: number of cells (default ~4*sqrt(N))")
    o.add_argument("--nprobe", type=int, default=None, help="ivf: cells visited per query (default 32)")
    o.add_argument("--hnsw-m", type=int, default=None, help="hnsw: links per node (default 32)")
    o.add_argument("--ef-construction", type=int, default=None, help="hnsw: build beam width (default 80)")
    o.add_argument("--ef-search", type=int, default=None, help="hnsw: search beam width (default 128)")
    o.add_argument("--pq-m", type=int, default=None, help="ivfpq: sub-quantizers, must divide the dimension (default 64)")
    o.add_argument("--chunk-size", type=int, default=256, help="images per committed chunk (default 256)")
    o.add_argument("--max-chunks", type=int, default=None, help="stop after encoding this many chunks (resume later)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def sources_from_args(args) -> list:
    from open_clip_cxr.search.build import shard_sources, table_source
    if bool(args.shards) == bool(args.source):
        raise ValueError("give exactly one of --shards PATTERN or --source LAYOUT")
    if args.shards:
        return shard_sources("::".join(args.shards))
    kw = dict(table=args.table, root=args.root, reports=args.reports)
    if args.views:
        kw["views"] = [v.strip() for v in args.views.split(",") if v.strip()]
    if args.source == "table":
        kw.update(image_col=args.image_col, report_col=args.report_col, findings_col=args.findings_col,
                  impression_col=args.impression_col, study_col=args.study_col, patient_col=args.patient_col,
                  split_col=args.split_col)
    return [table_source(args.source, **kw)]


def run(args) -> int:
    from open_clip_cxr.search.store import SearchIndexError
    try:
        sources = sources_from_args(args)
        if args.store is not None:          # refuse a bad name before loading the model
            from open_clip_cxr.search.store import check_store
            check_store(args.index_kind or "flat", args.store)
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        import open_clip_cxr
        from open_clip_cxr.search.build import build_index
        model, _, preprocess = open_clip_cxr.create_model_and_transforms(
            args.model, pretrained=args.pretrained, precision=args.precision, device=args.device)
        params = {"store": args.store, "nlist": args.nlist, "nprobe": args.nprobe, "m": args.hnsw_m,
                  "ef_construction": args.ef_construction, "ef_search": args.ef_search, "pq_m": args.pq_m}
        manifest = build_index(args.out, sources, model=model.eval(), preprocess=preprocess,
                               tokenizer=open_clip_cxr.get_tokenizer(args.model), model_name=args.model,
                               pretrained=args.pretrained, precision=args.precision, add=args.add,
                               overwrite=args.overwrite, kind=args.index_kind, params=params,
                               chunk_size=args.chunk_size, batch_size=args.batch_size, device=args.device,
                               progress=not args.no_progress, max_chunks=args.max_chunks, workers=args.workers,
                               log=lambda msg: print(msg, file=sys.stderr))
    except (SearchIndexError, ValueError, FileNotFoundError) as exc:
        print(f"open-clip-cxr index: error: {exc}", file=sys.stderr)
        return 2
    return 0 if manifest.get("complete") else 3
