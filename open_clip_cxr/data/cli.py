"""`open-clip-cxr shards`: write WebDataset shards from a CXR dataset (see `add_arguments`)."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

SOURCE_HELP = """\
layouts read by --source:
  mimic-cxr      --root: MIMIC-CXR-JPG folder (files/pXX/pSUBJECT/sSTUDY/DICOM.jpg and the
                 mimic-cxr-2.0.0-{split,metadata,chexpert}.csv.gz tables);
                 --reports: folder with files/pXX/pSUBJECT/sSTUDY.txt
                 (default: ROOT/mimic-cxr-reports, else ROOT)
  chexpert-plus  --table: the CheXpert Plus report csv; --root: the image folder it refers to
  openi          --reports: NLMCXR_reports.tgz or a folder of Open-I XML files;
                 --root: folder of <parentImage id>.png images
  table          --table: a .csv or .jsonl with an image path column and a report column;
                 relative paths are resolved against --root (default: the table's folder)

splits: the official one where the dataset has it (MIMIC split csv, CheXpert Plus and
table split columns), otherwise a hash of the patient id (study id if no patient).

output: OUT/{split}-{000000..}.tar and OUT/manifest.json. Rerunning the same command
keeps complete shards and redoes only missing or damaged ones; skipped samples and
their reasons are listed in the manifest and summarised at the end.

example:
  open-clip-cxr shards --source mimic-cxr --root /data/mimic-cxr-jpg --out shards/mimic \\
      --views PA,AP --workers 8 --variants
"""


def _size(text: str) -> int:
    """'1G', '500M', '64k' or a plain byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 500M or 1G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = SOURCE_HELP
    src = parser.add_argument_group("input")
    from open_clip_cxr.data.registry import sources
    src.add_argument("--source", required=True, choices=[n for n, s in sources().items() if s.images],
                     help="dataset layout to read (see below; more register with `@register_source`)")
    src.add_argument("--root", help="image folder (dataset root for mimic-cxr)")
    src.add_argument("--reports", help="report files: MIMIC reports folder, or Open-I tgz / XML folder")
    src.add_argument("--table", help="csv/jsonl for chexpert-plus and table sources")
    src.add_argument("--views", help="keep only these view positions, comma-separated (e.g. PA,AP)")
    src.add_argument("--limit", type=int, metavar="N", help="write only the first N samples (quick trials)")
    src.add_argument("--val-frac", type=float, default=0.1,
                     help="validation share for sources without an official split (default 0.1)")
    src.add_argument("--test-frac", type=float, default=0.1,
                     help="test share for sources without an official split (default 0.1)")
    cols = parser.add_argument_group("table columns (--source table)")
    cols.add_argument("--image-col", default="image", help="image path column (default: image)")
    cols.add_argument("--report-col", default="report", help="report text column (default: report)")
    cols.add_argument("--findings-col", help="findings section column, if any")
    cols.add_argument("--impression-col", help="impression section column, if any")
    cols.add_argument("--study-col", help="study id column (default: study_id or study, any case, if present; "
                                          "else one study per row)")
    cols.add_argument("--patient-col", help="patient id column, for patient-level hash splits "
                                            "(default: patient_id or patient, any case, if present)")
    cols.add_argument("--split-col", help="split column: train / validate / test (default: split, any case, if present)")
    cols.add_argument("--label-cols", nargs="+", default=None, metavar="COL",
                      help="label columns (1/0/-1) stored as each image's labels, for eval --task zeroshot --labels")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    out.add_argument("--max-side", type=int, default=512,
                     help="downscale so the longest image side is at most this (default 512)")
    out.add_argument("--format", dest="image_format", choices=["png", "jpg"], default="png",
                     help="image encoding in the shards (default png, lossless)")
    out.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality for --format jpg (default 95)")
    out.add_argument("--png-level", type=int, default=3,
                     help="PNG zlib level 0-9 (default 3: ~3x faster to write than 6, ~10%% larger)")
    out.add_argument("--samples-per-shard", type=int, default=1000, help="max samples per shard (default 1000)")
    out.add_argument("--max-shard-bytes", type=_size, default="1G",
                     help="max shard size, e.g. 500M or 1G (default 1G); whichever limit comes first")
    out.add_argument("--variants", nargs="?", const="rules", default=None, choices=["rules", "llm", "both"],
                     help="store report rewrites (equivalent paraphrases and one-error negatives) in the json: "
                          "rules (the default when given bare), llm (--paraphraser), or both")
    out.add_argument("--paraphraser", default=None, metavar="MODEL",
                     help="--variants llm|both: local causal LM folder or cached hub id; rewrites are kept only "
                          "when the mention check passes (counts in manifest.json), cached in OUT/llm_variants/")
    out.add_argument("--paraphraser-gguf", default=None, metavar="FILE", help="GGUF file inside --paraphraser")
    out.add_argument("--paraphraser-batch-size", type=int, default=8)
    out.add_argument("--seed", type=int, default=0, help="seed for the sample order and the variants (default 0)")
    run_opts = parser.add_argument_group("run")
    run_opts.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                          help="image decode/resize processes (default: min(8, CPUs))")
    run_opts.add_argument("--overwrite", action="store_true",
                          help="delete shards in --out made with other inputs or options instead of refusing")
    run_opts.add_argument("--verify", choices=["sha256", "size"], default="sha256",
                          help="how a rerun checks that an existing shard is complete (default sha256)")
    run_opts.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from open_clip_cxr.data.encode import EncodeOptions
    from open_clip_cxr.data.shard_writer import ShardLimits, ShardWriterError, format_summary, write_shards
    from open_clip_cxr.data.registry import iter_source
    from open_clip_cxr.data.table_source import resolve_table_columns
    from open_clip_cxr.errors import UsageError

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder for the shards")
    table_cols = {}
    if args.source == "table":
        if not args.table or not Path(args.table).is_file():
            raise UsageError(f"--table {args.table} is not a file; give the .csv or .jsonl of image paths and reports")
        table_cols = resolve_table_columns(
            args.table, image_col=args.image_col, report_col=args.report_col, findings_col=args.findings_col,
            impression_col=args.impression_col, study_col=args.study_col, patient_col=args.patient_col,
            split_col=args.split_col)
        print("table columns: " + ", ".join(f"{k[:-4]}={v}" for k, v in table_cols.items() if v), file=sys.stderr)
    views = [v.strip() for v in args.views.split(",") if v.strip()] if args.views else None
    try:
        records = iter_source(args.source, root=args.root, reports=args.reports, table=args.table, views=views,
                              val=args.val_frac, test=args.test_frac, **table_cols)
        if getattr(args, "label_cols", None):
            if args.source != "table":
                raise ValueError("--label-cols reads a --source table's columns; other sources bring their own labels")
            from open_clip_cxr.data.table_labels import attach_table_labels
            records = attach_table_labels(records, args.table, args.label_cols, image_col=args.image_col, root=args.root)
        llm = None
        if args.variants in ("llm", "both"):   # LLM rewrites, made here once, stored by the writer's workers
            if not args.paraphraser:
                raise ValueError(f"--variants {args.variants} needs --paraphraser MODEL (a local causal LM)")
            from open_clip_cxr.data.manifest import load_manifest
            from open_clip_cxr.reports.paraphrase import attach_llm_variants, load_llm_variants
            old = (load_manifest(args.out) or {}) if not args.overwrite else {}
            if old.get("splits") and (old.get("llm_variants") or {}).get("paraphraser") != args.paraphraser:
                raise ValueError(f"{args.out} holds shards made without --paraphraser {args.paraphraser}; "
                                 "pass --overwrite to replace them, or choose another --out")
            llm = load_llm_variants(args.paraphraser, os.path.join(args.out, "llm_variants"),   # before any report is read
                                    batch_size=args.paraphraser_batch_size, gguf_file=args.paraphraser_gguf,
                                    label="--paraphraser")
            records = attach_llm_variants(records, llm)
        manifest = write_shards(
            records, args.out,
            options=EncodeOptions(max_side=args.max_side, image_format=args.image_format,
                                  jpeg_quality=args.jpeg_quality, png_level=args.png_level,
                                  variants=args.variants in ("rules", "both"), seed=args.seed),
            limits=ShardLimits(args.samples_per_shard, args.max_shard_bytes),
            workers=args.workers, limit=args.limit, overwrite=args.overwrite, verify=args.verify,
            progress=not args.no_progress)
    except (ShardWriterError, ValueError, FileNotFoundError) as exc:
        print(f"open-clip-cxr shards: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if llm is not None:
        from open_clip_cxr.data.manifest import save_manifest
        manifest["llm_variants"] = {**llm.summary(), "paraphraser": args.paraphraser}
        save_manifest(args.out, manifest)
        print(f"LLM variants ({llm.summary()['model']}): kept {llm.summary()['kept']}, dropped {llm.summary()['dropped']}")
    print(format_summary(manifest, args.out))
    return 0
