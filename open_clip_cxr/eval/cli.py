"""`open-clip-cxr eval`: retrieval, zero-shot findings, retrieval-based report generation, text robustness.

Every task writes OUT/results.json (metrics plus the settings used); retrieval also writes the
top-k of every query as CSV, report-gen one JSON line per generated report.
"""
import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, NamedTuple, Tuple


class Task(NamedTuple):
    """An eval task: `run(args, model, preprocess, tokenizer) -> results dict`, and the flags it needs."""
    run: Callable
    needs: Tuple[str, ...] = ("model", "shards")
    prints_own: bool = False   # the task prints its own summary (else the metrics are printed)


TASKS: Dict[str, Task] = {}   # --task name -> Task, filled by @register_task below


def register_task(name: str, needs: Tuple[str, ...] = ("model", "shards"), prints_own: bool = False):
    """Decorator: make `run` the `--task name` of `open-clip-cxr eval` (a new task is one function)."""
    def deco(run):
        TASKS[name] = Task(run, tuple(needs), prints_own)
        return run
    return deco

EPILOG = """examples:
  open-clip-cxr eval --task retrieval --model cxr-llm-small --pretrained ckpt.pt \\
      --shards 'shards/test-{000000..000004}.tar' --out runs/eval --gallery runs/eval/gallery
  open-clip-cxr eval --task zeroshot --model local-dir:exported/ --shards 'shards/test-{000000..000004}.tar' --out runs/zs
  open-clip-cxr eval --task report-gen --model hf-hub:org/model --shards 'shards/test-*.tar' \\
      --bank-shards 'shards/train-{000000..000099}.tar' --judge StanfordAIMI/GREEN-radllama2-7b --out runs/rg
  open-clip-cxr eval --task text-robustness --model cxr-llm-small --baselines bow,minilm --out runs/robust

Shard patterns use braces ({000000..000009}) or globs (test-*.tar); join several with '::' or give
the option twice. Missing, truncated or manifest-mismatched shards are refused (--allow-partial).
Retrieval is study-level: image->report is correct when the study's report is in the top K,
report->image when ANY image of the study is. Ties count against the model (--ties).
--match text counts a report that reads the same as the true one (case, whitespace and list
numbering aside) as a hit; --match both reports both, with the number of distinct reports."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__.splitlines()[0]
    p.epilog = EPILOG
    p.add_argument("--task", choices=list(TASKS), default="retrieval", help="what to evaluate (default: retrieval)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="OpenCLIP model: a name, 'local-dir:PATH' or 'hf-hub:ORG/REPO' "
                                   "(text-robustness: optional when --baselines are given)")
    m.add_argument("--pretrained", default=None, help="checkpoint file or pretrained tag (ignored for local-dir:/hf-hub:)")
    m.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    m.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "pure_fp16", "pure_bf16"],
                   help="model precision (default: auto: bf16 where measured faster on this CPU or supported "
                        "by the GPU, else fp32; OPEN_CLIP_CXR_PRECISION overrides)")
    m.add_argument("--batch-size", type=int, default=64, help="images or reports per forward pass")
    d = p.add_argument_group("data")
    d.add_argument("--shards", action="append", help="WebDataset shards to evaluate (brace pattern)")
    d.add_argument("--split", default=None, help="keep only samples whose metadata split is this (default: all)")
    d.add_argument("--bank-shards", action="append", help="report-gen: shards whose reports form the bank")
    d.add_argument("--bank-split", default="train", help="report-gen: split of the bank ('any': all; default train)")
    d.add_argument("--limit", type=int, default=None, help="read at most this many images (each of test and bank)")
    d.add_argument("--workers", type=int, default=0, help="shard-reading worker processes")
    d.add_argument("--allow-partial", action="store_true",
                   help="evaluate despite missing/damaged shards (left out, counted in results.json) instead of refusing")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="folder for results.json and per-query files")
    o.add_argument("--gallery", default=None, help="retrieval: also write an HTML gallery into this folder")
    o.add_argument("--gallery-queries", type=int, default=12, help="image queries shown in the gallery")
    r = p.add_argument_group("retrieval")
    r.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="recall cut-offs (default: 1 5 10)")
    r.add_argument("--ties", choices=["pessimistic", "optimistic"], default="pessimistic",
                   help="tied non-matching items count against the query (pessimistic, default) or not")
    r.add_argument("--match", choices=["study", "text", "both"], default="study",
                   help="a hit is the query's own study (study, default), any study whose report reads the same "
                        "after normalising case, whitespace and list numbering (text), or report both")
    r.add_argument("--storage-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype embeddings are held in during search (scores are always float32)")
    r.add_argument("--chunk-size", type=int, default=1024, help="queries per similarity block")
    r.add_argument("--similarity", choices=["clip", "cosine", "dot"], default=None,
                   help="image-report score: 'cosine' (L2-normalised), 'clip' (logit_scale * I @ T^T, no "
                        "normalisation, the authors' LLM2CLIP4CXR) or 'dot' (default: what the model was trained with)")
    z = p.add_argument_group("zero-shot")
    z.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="label names to score (from the shards' metadata; a table source's --label-cols); "
                        "default: every class with prompts")
    z.add_argument("--prompts", default=None, metavar="YAML",
                   help="class -> {positive: [...], negative: [...]} prompts, replacing the built-in CheXpert ones")
    g = p.add_argument_group("report generation")
    g.add_argument("--top-k-reports", type=int, default=1, help="join this many distinct retrieved reports")
    g.add_argument("--judge", default=None, help="GREEN judge: model id or folder (e.g. StanfordAIMI/GREEN-radllama2-7b)")
    g.add_argument("--judge-gguf-file", default=None, help="GGUF file inside --judge (for a small stand-in judge)")
    g.add_argument("--judge-batch-size", type=int, default=8, help="GREEN judge batch (GREEN's own: 8)")
    g.add_argument("--judge-max-new-tokens", type=int, default=None,
                   help="cap the judge's answer (default: GREEN's max_length of 2048 tokens, prompt included)")
    g.add_argument("--judge-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="judge weights dtype (GREEN's own: float16)")
    g.add_argument("--bertscore-model", default="minilm",
                   help="BERTScore encoder: folder or cached hub id ('minilm': the shipped MiniLM; 'none': skip)")
    g.add_argument("--bertscore-layers", type=int, default=None,
                   help="BERTScore layer (default: bert-score's tuned layer for known models, else the last)")
    g.add_argument("--bertscore-idf", action="store_true", help="BERTScore idf weights (from the references)")
    g.add_argument("--bertscore-baseline", default=None,
                   help="rescale BERTScore with a baseline: 'builtin' (bert-score's, known models) or a .tsv file")
    g.add_argument("--radgraph", nargs="?", const="radgraph", default=None,
                   choices=["radgraph", "radgraph-xl", "modern-radgraph-xl"],
                   help="add RadGraph-F1 (the `radgraph` package; its weights must be in its cache folder)")
    g.add_argument("--chexbert", action="store_true",
                   help="add CheXbert-F1 (the `f1chexbert` package; chexbert.pth must be in its cache folder)")
    g.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")
    t = p.add_argument_group("text robustness")
    t.add_argument("--baselines", default="", help="comma list from: bow, minilm (compared side by side)")
    t.add_argument("--reports-source", default="openi", metavar="NAME",
                   help="report source (a registered one: openi, table, shards, mimic-cxr, ...; default openi)")
    t.add_argument("--reports-path", default=None, metavar="PATH",
                   help="the source's input (Open-I tgz / XML folder, a table, shard urls); default: Open-I's")
    t.add_argument("--reports-split", default="test",
                   help="split to use ('all': every report); several, comma-separated (validate,test): each is its "
                        "own gallery, then --model is paired with each baseline over all of them, report by report")
    t.add_argument("--reports-limit", type=int, default=None, help="at most this many reports")
    t.add_argument("--seed", type=int, default=0, help="variant and gallery sampling seed")
    t.add_argument("--draws", type=int, default=1, metavar="N",
                   help="run the suite on seeds --seed .. --seed+N-1 (new rewrites of the same reports) and pair "
                        "--model with each baseline over all draws, report by report")
    t.add_argument("--styles", choices=("train", "heldout", "both"), default="train",
                   help="rewrite rules of the variants: the training part of the style split, the held-out "
                        "part and unseen rewrites (the style-held-out protocol), or both tables")


def _urls(patterns):
    return "::".join(patterns) if patterns else None


def _check_shards(args) -> dict:
    """Refuse missing, damaged or manifest-mismatched shards unless --allow-partial (see
    data/shard_check.py); --shards / --bank-shards become the checked lists of shard paths."""
    from open_clip_cxr.data.shard_check import check_shards
    report = {}
    for name in ("shards", "bank_shards"):
        if getattr(args, name, None):
            check = check_shards(getattr(args, name), allow_partial=args.allow_partial)
            report[name] = {"patterns": getattr(args, name), **check.as_dict()}
            setattr(args, name, check.urls)
    return report


def load_model(args):
    """(model, preprocess, tokenizer) on args.device; our plugin registers its model names on import."""
    import open_clip_cxr
    from open_clip_cxr.eval.encode import model_precision
    model, _, preprocess = open_clip_cxr.create_model_and_transforms(
        args.model, pretrained=args.pretrained, precision=model_precision(args.precision, args.device),
        device=args.device)
    return model.eval(), preprocess, open_clip_cxr.get_tokenizer(args.model)


def _search_kw(args):
    import torch
    return {"ties": args.ties, "chunk_size": args.chunk_size, "device": args.device,
            "storage_dtype": getattr(torch, args.storage_dtype)}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)


def _require(args, *names):
    missing = [n for n in names if not getattr(args, n.replace("-", "_"))]
    if missing:
        raise SystemExit(f"--task {args.task} needs " + ", ".join(f"--{n}" for n in missing))


@register_task("retrieval")
def run_retrieval(args, model, preprocess, tokenizer) -> dict:
    from open_clip_cxr.eval.encode import embed_shards, similarity_of
    from open_clip_cxr.eval.retrieval import recall_by_match, write_topk_csv
    similarity = args.similarity or similarity_of(model)
    emb = embed_shards(model, preprocess, tokenizer, _urls(args.shards), args.batch_size, args.device,
                       limit=args.limit, splits=[args.split] if args.split else None,
                       num_workers=args.workers, similarity=similarity)
    metrics, levels = recall_by_match(emb.image_emb, emb.image_study_ids, emb.text_emb, emb.text_study_ids,
                                      emb.texts, match=args.match, ks=args.ks, return_details=True,
                                      **_search_kw(args))
    det = levels["study" if args.match == "both" else args.match]
    extra = {d: {"true_rank_text": levels["text"][d].ranks} for d in det} if args.match == "both" else {}
    write_topk_csv(os.path.join(args.out, "image_to_text_topk.csv"), emb.image_keys, emb.text_study_ids,
                   det["image_to_text"], emb.image_study_ids, extra.get("image_to_text"))
    write_topk_csv(os.path.join(args.out, "text_to_image_topk.csv"), emb.text_study_ids, emb.image_keys,
                   det["text_to_image"], emb.text_study_ids, extra.get("text_to_image"))
    metrics["skipped_samples"] = emb.skipped
    metrics["similarity"] = similarity
    if args.gallery:
        from open_clip_cxr.eval.gallery import collect_thumbnails, plan_gallery, write_gallery
        t2i, i2t = det["text_to_image"].indices, det["image_to_text"].indices
        iq, tq, keys = plan_gallery(len(emb.image_keys), len(emb.texts), emb.image_keys, t2i,
                                    args.gallery_queries, max(1, args.gallery_queries * 2 // 3), args.seed)
        thumbs = collect_thumbnails(_urls(args.shards), keys)
        path = write_gallery(args.gallery, image_keys=emb.image_keys, image_study_ids=emb.image_study_ids,
                             text_study_ids=emb.text_study_ids, texts=emb.texts, i2t_indices=i2t,
                             t2i_indices=t2i, images=thumbs, image_queries=iq, text_queries=tq)
        print(f"wrote {path}", file=sys.stderr)
    return metrics


@register_task("zeroshot")
def run_zeroshot(args, model, preprocess, tokenizer) -> dict:
    from open_clip_cxr.eval import zeroshot as Z
    from open_clip_cxr.eval.encode import embed_shards, encode_texts
    try:   # a bad prompts file or an unknown label is the user's to fix, before any embedding
        prompts = Z.load_prompts(args.prompts) if args.prompts else Z.PROMPTS
        if args.labels:
            prompts = Z.select_prompts(prompts, args.labels)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e))
    emb = embed_shards(model, preprocess, None, _urls(args.shards), args.batch_size, args.device,
                       limit=args.limit, splits=[args.split] if args.split else None,
                       num_workers=args.workers)
    labels = [emb.meta[s].get("labels") for s in emb.image_study_ids]
    if args.labels:
        from open_clip_cxr.data.table_labels import label_names
        try:
            Z.select_prompts(prompts, args.labels, available=label_names({"labels": lab} for lab in labels))
        except ValueError as e:
            raise SystemExit(str(e))
    encode_fn = lambda texts: encode_texts(model, tokenizer, texts, args.batch_size, args.device)  # noqa: E731
    res = Z.evaluate_zeroshot(emb.image_emb, labels, encode_fn, logit_scale=Z.model_logit_scale(model), prompts=prompts)
    res["prompts"] = args.prompts or "built-in CheXpert prompts"
    return res


@register_task("report-gen")
def run_report_gen(args, model, preprocess, tokenizer) -> dict:
    from open_clip_cxr.eval.encode import embed_shards
    from open_clip_cxr.eval.report_gen import evaluate_report_generation, retrieve_reports
    _require(args, "bank-shards")
    from open_clip_cxr.eval.clinical_metrics import MetricUnavailableError
    from open_clip_cxr.eval.report_gen import check_clinical_metrics
    try:   # before any embedding: an asked-for metric that cannot run is a usage error
        check_clinical_metrics(args.radgraph, args.chexbert)
    except MetricUnavailableError as e:
        raise SystemExit(str(e))
    scorer = judge = None   # built first: a missing model fails before any embedding
    if args.bertscore_model.lower() != "none":
        from open_clip_cxr.eval.text_metrics import BertScorer
        base = args.bertscore_baseline
        scorer = BertScorer(args.bertscore_model, num_layers=args.bertscore_layers, idf=args.bertscore_idf,
                            rescale_with_baseline=bool(base), baseline_path=None if base in (None, "builtin") else base,
                            device=args.device)
    if args.judge:
        from open_clip_cxr.eval.green import GreenJudge
        kw = {"gguf_file": args.judge_gguf_file} if args.judge_gguf_file else {}
        judge = GreenJudge.from_pretrained(args.judge, device=args.device, batch_size=args.judge_batch_size,
                                           max_new_tokens=args.judge_max_new_tokens, dtype=args.judge_dtype, progress=True,
                                           cache_path=os.path.join(args.out, "green_cache.jsonl"), label="--judge", **kw)
    test = embed_shards(model, preprocess, None, _urls(args.shards), args.batch_size, args.device,
                        limit=args.limit, splits=[args.split] if args.split else None,
                       num_workers=args.workers)
    bank_splits = None if args.bank_split == "any" else [args.bank_split]
    bank = embed_shards(model, preprocess, tokenizer, _urls(args.bank_shards), args.batch_size, args.device,
                        limit=args.limit, splits=bank_splits, num_workers=args.workers)
    generated, used = retrieve_reports(test.image_emb, test.image_study_ids, bank.text_emb, bank.text_study_ids,
                                       bank.texts, k=args.top_k_reports, **_search_kw(args))
    study_text = dict(zip(test.text_study_ids, test.texts))
    references = [study_text[s] for s in test.image_study_ids]
    res = evaluate_report_generation(generated, references, bert_scorer=scorer, judge=judge, meteor=not args.no_meteor,
                                     radgraph=args.radgraph, chexbert=args.chexbert, device=args.device)
    per_green = res.pop("per_report_green", None)
    with open(os.path.join(args.out, "generated.jsonl"), "w") as f:
        for i, key in enumerate(test.image_keys):
            rec = {"image": key, "study_id": test.image_study_ids[i], "retrieved_studies": used[i],
                   "generated": generated[i], "reference": references[i]}
            if per_green is not None:
                rec["green"] = {k: v for k, v in per_green[i].items() if k != "output"}
            f.write(json.dumps(rec) + "\n")
    res["bank_reports"] = len(bank.texts)
    return res


@register_task("text-robustness", needs=(), prints_own=True)   # --model and/or --baselines, checked inside
def run_text_robustness(args, model, preprocess, tokenizer) -> dict:
    from open_clip_cxr.eval import robustness as R
    draws = getattr(args, "draws", 1)
    if draws < 1:
        raise SystemExit(f"--draws {draws}: give 1 or more draws of the suite")
    from open_clip_cxr.reports.splits import split_list
    try:
        splits = [None] if args.reports_split == "all" else split_list(args.reports_split)
    except ValueError as e:
        raise SystemExit(f"--reports-split {e}, or 'all'")
    spec = {"source": getattr(args, "reports_source", "openi"), "path": getattr(args, "reports_path", None)}
    loaded = {split: R.load_reports(spec, split=split, limit=args.reports_limit) for split in splits}
    for split, reports in loaded.items():   # every split checked before anything is encoded
        if not reports:
            raise SystemExit(f"--reports-split {args.reports_split}: the {spec['source']} source has no reports in "
                             f"split {split!r}; name a split it has (train, validate, test) or 'all'")
    encoders = {}
    if model is not None:
        encoders[args.model] = R.openclip_encode_fn(model, tokenizer, args.device, args.batch_size)
    for b in filter(None, (x.strip() for x in args.baselines.split(","))):
        if b == "bow":
            encoders["bag-of-words"] = R.bow_encode_fn()
        elif b == "minilm":
            encoders["MiniLM-L6 (mean pool)"] = R.hf_mean_pool_encode_fn(device=args.device)
        else:
            raise SystemExit(f"unknown baseline {b!r}; use bow, minilm")
    if not encoders:
        raise SystemExit("--task text-robustness needs --model or --baselines")
    from open_clip_cxr.eval.paired import OffsetReports, format_paired, format_pooled, format_reachable
    bases = tuple(name for name in encoders if name != args.model)
    by_split, pooled, offset = {}, {}, 0
    for split, reports in loaded.items():   # each split its own gallery; paired over all, report ids kept apart
        where = f", {split} split" if len(splits) > 1 else ""
        by_seed = by_split[split] = {}
        for seed in range(args.seed, args.seed + draws):
            by_seed[seed] = suites = R.run_suites(reports, encoders, seed=seed, styles=args.styles)
            for st, results in suites.items():
                print(f"== {st} styles{where}" + (f", seed {seed}" if draws > 1 else "") + "\n" + R.format_table(results))
                if model is not None and bases:   # is a gap to a baseline more than chance? pair item by item
                    print(format_paired(results, args.model, baselines=bases))
                pooled.setdefault(st, []).append(
                    (results, OffsetReports(R.row_reports(reports, seed=seed, styles=st), offset)))
        offset += len(reports)
    if len(splits) * draws > 1 and model is not None and bases:   # a report is one trial over the draws
        for st, st_draws in pooled.items():
            over = f" of {len(splits)} splits ({offset} reports)" if len(splits) > 1 else ""
            print(f"== {st} styles over {draws} draws{over}\n" + format_pooled(st_draws, args.model, baselines=bases))
            print(format_reachable(st_draws, baselines=bases))
    by_seed = by_split[splits[0]]
    first = by_seed[args.seed]
    # by_model: the first protocol's results (train, unless --styles heldout); by_protocol: each;
    # by_seed: every draw (--draws), keyed by its seed, of the first split; by_split: every split's by_seed
    return {"by_model": next(iter(first.values())), "by_protocol": first, "styles": args.styles,
            "reports": spec["source"], "reports_split": args.reports_split,
            **({"by_seed": {str(s): v for s, v in by_seed.items()}} if draws > 1 else {}),
            **({"by_split": {sp: {str(s): v for s, v in bs.items()} for sp, bs in by_split.items()}}
               if len(splits) > 1 else {})}


def run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    model = preprocess = tokenizer = None
    task = TASKS[args.task]
    _require(args, *task.needs)
    shard_check = _check_shards(args)
    if args.model:
        model, preprocess, tokenizer = load_model(args)
    res = task.run(args, model, preprocess, tokenizer)
    settings = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, list, type(None)))}
    out = {"task": args.task, "results": res, "settings": settings, "seconds": round(time.time() - started, 1)}
    out["shard_check"] = shard_check
    _write_json(os.path.join(args.out, "results.json"), out)
    if not task.prints_own:
        print(json.dumps(res.get("metrics", res), indent=2, default=str)[:4000])
    return 0
