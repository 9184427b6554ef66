"""`open-clip-cxr search`: ranked studies for a report-like text or a film (DICOM, 16-bit PNG, JPEG)."""
from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  open-clip-cxr search --index runs/index --text "left lower lobe consolidation with effusion"
  open-clip-cxr search --index runs/index --image film.dcm --k 5 --json

--text ranks studies by their best-matching image; --image ranks studies by their report
(the nearest reports: retrieval-based report drafting). Scores are cosine similarities."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--index", required=True, metavar="DIR", help="index folder written by `open-clip-cxr index`")
    p.add_argument("--text", action="append", default=[], help="a report-like query (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file to query with (repeatable)")
    p.add_argument("--k", type=int, default=10, help="studies per query (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.add_argument("--model", default=None, help="must name the index's model (default: read from the index)")
    p.add_argument("--pretrained", default=None, help="checkpoint (default: the one the index was built with)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def format_results(query: str, records: list) -> str:
    lines = [f"query: {query}"]
    if not records:
        lines.append("  (no results)")
    for r in records:
        flag = "  <- the query image's own study" if r.get("query_match") else ""
        lines.append(f"{r['rank']:3d}. {r['score']:+.4f}  study {r['study_id']}  patient {r['patient_id'] or '-'}  "
                     f"split {r['split'] or '-'}  view {r['view'] or '-'}  images {r['n_images']}{flag}")
        lines.append(f"      {r['snippet']}")
    return "\n".join(lines)


def run(args) -> int:
    from open_clip_cxr.search.store import SearchIndexError
    from open_clip_cxr.vision.io import ImageReadError
    if not args.text and not args.image:
        print("open-clip-cxr search: error: give --text \"...\" or --image PATH", file=sys.stderr)
        return 2
    try:
        from open_clip_cxr.search.index import Index
        index = Index.open(args.index, model_name=args.model, pretrained=args.pretrained, device=args.device)
        results = []
        if args.text:
            results += [{"query": t, "kind": "text", "results": r}
                        for t, r in zip(args.text, index.search_text(list(args.text), args.k))]
        if args.image:
            results += [{"query": p, "kind": "image", "results": r}
                        for p, r in zip(args.image, index.search_image(list(args.image), args.k))]
    except (SearchIndexError, ImageReadError, ValueError, FileNotFoundError) as exc:
        print(f"open-clip-cxr search: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(format_results(r["query"], r["results"]) for r in results))
    return 0
