"""Chunked nearest-neighbour search, ranks of true matches, and study-level recall@K.

Similarities are computed one (query chunk x gallery chunk) block at a time, so memory
stays bounded whatever the sizes: a 100k x 100k float32 score matrix would be 40 GB.

Ranks. A query's *true* gallery items are those sharing its group id (its study). Its rank
is the number of non-true gallery items scoring strictly above its best true item, plus,
with ``ties="pessimistic"`` (the default), the non-true items tying with it (|s - best| <=
``tie_tol``): duplicated reports, common in report banks, then count against the model
instead of flattering it. ``ties="optimistic"`` leaves ties out. Rank 0 means top-1.

Matching (``match``). ``"study"``: the true items are those of the query's own study.
``"text"``: those whose report reads the same after `normalize_report` (case, whitespace and
list numbering); archives repeat reports ("No acute cardiopulmonary process", a patient's
follow-up films with the same note), and retrieving another study's identical report is then
a hit, not a miss. report->image under ``"text"``: any image of a study whose report equals
the query. ``"both"`` reports the two side by side with the number of distinct reports.

Scores of the best true item and of the items near it come from the same block products,
so whether two items tie is decided consistently. The scan counts items against a threshold
computed beforehand from the true pairs alone; items within a small band of it are kept and
settled exactly once the scan is over (and the rare query whose threshold moved by more than
the band is scanned again).
"""
import csv
import math
import re
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Sequence

import numpy as np
import torch

TIES = ("pessimistic", "optimistic")
MATCHES = ("study", "text", "both")

# list numbering: "1." / "2)" / "(3)" followed by a space, at the start of the text, of a line
# or after a sentence's end ("... effusion. 2. Stable ..."); "1.5 cm" and "grade 2." are kept
_LIST_NUMBER = re.compile(r"(^|\n|[.:;!?]\s)\s*\(?\d{1,2}[.)](?=\s)")
_BULLET = re.compile(r"(^|\n)\s*[-*\u2022]\s+")
_SPACE = re.compile(r"\s+")


def normalize_report(text: str) -> str:
    """A report's text for exact matching: lower case, list numbers and bullets dropped,
    whitespace collapsed. Nothing else changes (punctuation, wording, abbreviations stay)."""
    t = _BULLET.sub(r"\1", (text or "").lower())
    t = _LIST_NUMBER.sub(r"\1", t)
    return _SPACE.sub(" ", t).strip()


@dataclass
class SearchResult:
    """Top-k per query (scores descending) and, when asked for, the rank of the best true item."""
    scores: torch.Tensor                     # [Q, k] float32
    indices: torch.Tensor                    # [Q, k] int64 gallery positions
    ranks: Optional[torch.Tensor] = None     # [Q] int64, 0 = top-1; -1 where the query has no true item
    n_tied: Optional[torch.Tensor] = None    # [Q] non-true items tying with the best true item
    best_true: Optional[torch.Tensor] = None  # [Q] score of the best true item (-inf where none)


def _group_codes(query_groups, gallery_groups):
    """Map arbitrary hashable group ids to shared integer codes (-1: not in the gallery)."""
    codebook: Dict[Hashable, int] = {}
    g = np.fromiter((codebook.setdefault(x, len(codebook)) for x in gallery_groups), dtype=np.int64,
                    count=len(gallery_groups))
    q = np.fromiter((codebook.get(x, -1) for x in query_groups), dtype=np.int64, count=len(query_groups))
    return q, g


def _same_group_pairs(q_codes: np.ndarray, g_codes: np.ndarray):
    """All (query, gallery) index pairs sharing a group, sorted by query then gallery index."""
    order = np.argsort(g_codes, kind="stable")
    sorted_codes = g_codes[order]
    starts = np.searchsorted(sorted_codes, q_codes, "left")
    lens = np.searchsorted(sorted_codes, q_codes, "right") - starts
    lens[q_codes < 0] = 0
    q_idx = np.repeat(np.arange(len(q_codes)), lens)
    offsets = np.arange(len(q_idx)) - np.repeat(np.cumsum(lens) - lens, lens)
    g_idx = order[np.repeat(starts, lens) + offsets]
    return torch.from_numpy(q_idx), torch.from_numpy(g_idx)


def _as_storage(x: torch.Tensor, dtype) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x.detach().to(dtype) if dtype is not None else x.detach()


def _pair_scores(queries, gallery, pq, pg, chunk=4096):
    """Dot products of the listed pairs only (no matrix), in float32."""
    out = torch.empty(len(pq), dtype=torch.float32)
    for s in range(0, len(pq), chunk):
        a = queries[pq[s:s + chunk]].to(gallery.device).float()
        b = gallery[pg[s:s + chunk]].float()
        out[s:s + chunk] = (a * b).sum(-1).cpu()
    return out


def search(queries: torch.Tensor, gallery: torch.Tensor, k: int = 10,
           query_groups: Optional[Sequence] = None, gallery_groups: Optional[Sequence] = None, *,
           with_ranks: bool = False, exclude_same_group: bool = False,
           chunk_size: int = 1024, gallery_chunk_size: int = 8192,
           storage_dtype: Optional[torch.dtype] = None, device=None,
           ties: str = "pessimistic", tie_tol: float = 1e-6, progress: bool = False) -> SearchResult:
    """Top-k gallery items per query by dot product, scanning the gallery chunk by chunk.

    ``query_groups``/``gallery_groups`` (any hashable ids, e.g. study ids) define true matches.
    ``with_ranks`` also returns each query's rank of its best true item (same pass);
    ``exclude_same_group`` instead hides same-group items (e.g. a query's own study).
    ``storage_dtype`` (float16/bfloat16) halves the memory of the stored embeddings; blocks
    are always multiplied in float32 so that scores, and ties, are not rounded to 8 bits.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if with_ranks and exclude_same_group:
        raise ValueError("with_ranks and exclude_same_group are exclusive: excluding the true items leaves nothing to rank")
    queries, gallery = _as_storage(queries, storage_dtype), _as_storage(gallery, storage_dtype)
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]} but gallery has dim {gallery.shape[1]}")
    n_q, n_g = queries.shape[0], gallery.shape[0]
    if n_g == 0:
        raise ValueError("the gallery is empty")
    device = torch.device(device) if device is not None else queries.device
    if device.type != "cpu":
        gallery = gallery.to(device)   # once, rather than a copy per query chunk
    k = min(k, n_g)
    gallery_chunk_size = max(1, min(gallery_chunk_size, 32767))   # per-block counts are int16
    need_pairs = with_ranks or exclude_same_group
    if need_pairs:
        if query_groups is None or gallery_groups is None:
            raise ValueError("query_groups and gallery_groups are needed for ranks or exclusion")
        if len(query_groups) != n_q or len(gallery_groups) != n_g:
            raise ValueError(f"{len(query_groups)} query groups for {n_q} queries, "
                             f"{len(gallery_groups)} gallery groups for {n_g} gallery items")
        pq, pg = _same_group_pairs(*_group_codes(query_groups, gallery_groups))
    else:
        pq = pg = torch.zeros(0, dtype=torch.long)

    top_s = torch.full((n_q, k), -math.inf)
    top_i = torch.full((n_q, k), -1, dtype=torch.long)
    ranks = n_tied = best = None
    if with_ranks:
        t_pre = torch.full((n_q,), -math.inf)
        t_pre.scatter_reduce_(0, pq, _pair_scores(queries, gallery, pq, pg), "amax")
        step = 8192   # float32 copies of half-precision slices stay small
        g_max = max(float(gallery[s:s + step].float().norm(dim=1).max()) for s in range(0, n_g, step))
        q_norm = torch.cat([queries[s:s + step].float().norm(dim=1) for s in range(0, n_q, step)])
        # float32 block products differ from the pair dots by ~1e-7 x norms; 1e-4 is ample
        band = torch.clamp(1e-4 * q_norm * g_max, min=4 * tie_tol)
        n_greater = torch.zeros(n_q, dtype=torch.long)
        n_tied = torch.zeros(n_q, dtype=torch.long)
        best = torch.full((n_q,), -math.inf)

    pair_bounds = torch.searchsorted(pq, torch.arange(0, n_q + chunk_size, chunk_size).clamp(max=n_q))
    chunks = range(0, n_q, chunk_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="search", unit="chunk")
    for c, q0 in enumerate(chunks):
        q1 = min(q0 + chunk_size, n_q)
        rows = torch.arange(q0, q1)
        p0, p1 = int(pair_bounds[c]), int(pair_bounds[c + 1])
        scan = _scan_rows(queries, gallery, rows, pq[p0:p1] - q0, pg[p0:p1], k, gallery_chunk_size, device,
                          exclude_same_group, t_pre[rows] if with_ranks else None,
                          band[rows] if with_ranks else None, tie_tol)
        top_s[q0:q1], top_i[q0:q1] = scan["top_s"], scan["top_i"]
        if with_ranks:
            moved = (scan["best"] - t_pre[rows]).abs() + tie_tol > band[rows]
            moved &= torch.isfinite(scan["best"])
            if moved.any():   # rare: rescan those rows around the threshold the scan found
                sub = rows[moved]
                keep = torch.isin(pq[p0:p1], sub)
                local = torch.searchsorted(sub, pq[p0:p1][keep])
                again = _scan_rows(queries, gallery, sub, local, pg[p0:p1][keep], 1, gallery_chunk_size,
                                   device, False, scan["best"][moved], band[sub], tie_tol)
                if ((again["best"] - scan["best"][moved]).abs() + tie_tol > band[sub]).any():
                    raise RuntimeError("scores of true items are unstable between passes; raise tie_tol")
                for key in ("n_greater", "n_tied", "best"):
                    scan[key][moved] = again[key]
            n_greater[q0:q1], n_tied[q0:q1], best[q0:q1] = scan["n_greater"], scan["n_tied"], scan["best"]
    top_i[torch.isinf(top_s) & (top_s < 0)] = -1   # slots only excluded items could fill
    if with_ranks:
        ranks = n_greater + (n_tied if ties == "pessimistic" else 0)
        ranks[~torch.isfinite(best)] = -1
    return SearchResult(top_s, top_i, ranks, n_tied, best)


def _scan_rows(queries, gallery, rows, pr, pg, k, gcs, device, exclude, t_pre, band, tie_tol):
    """One pass over the gallery for the query rows ``rows``; ``pr``/``pg`` are their same-group
    pairs (row position within ``rows``, gallery index), sorted by gallery index inside each row."""
    n = len(rows)
    qc = queries[rows].to(device=device, dtype=torch.float32)
    top_s = torch.full((n, 0), -math.inf, device=device)
    top_i = torch.full((n, 0), -1, dtype=torch.long, device=device)
    ranking = t_pre is not None
    if ranking:
        hi = (t_pre + band).to(device)[:, None]
        lo = (t_pre - band).to(device)[:, None]
        n_greater = torch.zeros(n, dtype=torch.long, device=device)
        best = torch.full((n,), -math.inf, device=device)
        band_rows, band_vals = [], []
    pr, pg = pr.to(device), pg.to(device)
    for g0 in range(0, gallery.shape[0], gcs):
        g1 = min(g0 + gcs, gallery.shape[0])
        s = qc @ gallery[g0:g1].to(device=device, dtype=torch.float32).T
        inside = (pg >= g0) & (pg < g1)
        r, c = pr[inside], pg[inside] - g0
        if ranking and len(r):
            best.scatter_reduce_(0, r, s[r, c], "amax")
        if exclude:
            s[r, c] = -math.inf
        kk = min(k, g1 - g0)
        cs, ci = s.topk(kk, dim=1)
        both_s, both_i = torch.cat([top_s, cs], 1), torch.cat([top_i, ci + g0], 1)
        top_s, pos = both_s.topk(min(k, both_s.shape[1]), dim=1)
        top_i = both_i.gather(1, pos)
        if ranking:
            s[r, c] = -math.inf   # a true item never counts against its own query
            gt_hi = s > hi
            gt_lo = s >= lo
            # int16 sums vectorise (int64 bool sums are ~30x slower on CPU); a block has < 2**15 columns
            n_hi = gt_hi.sum(1, dtype=torch.int16)
            n_greater += n_hi
            if bool((gt_lo.sum(1, dtype=torch.int16) > n_hi).any()):
                br, bc = torch.nonzero(gt_lo & ~gt_hi, as_tuple=True)
                band_rows.append(br)
                band_vals.append(s[br, bc])
    out = {"top_s": top_s.cpu(), "top_i": top_i.cpu()}
    if ranking:
        n_tied = torch.zeros(n, dtype=torch.long, device=device)
        if band_rows:
            br, bv = torch.cat(band_rows), torch.cat(band_vals)
            tb = best[br]
            n_greater.scatter_add_(0, br, (bv > tb + tie_tol).long())
            n_tied.scatter_add_(0, br, ((bv - tb).abs() <= tie_tol).long())
        out.update(n_greater=n_greater.cpu(), n_tied=n_tied.cpu(), best=best.cpu())
    return out


def chunked_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 1024, **kw):
    """(scores [Q, k], gallery indices [Q, k]) of the k best dot products per query, chunk by chunk."""
    r = search(queries, gallery, k, chunk_size=chunk_size, **kw)
    return r.scores, r.indices   # index -1 (score -inf) where exclusion left fewer than k items


def rank_of_targets(queries: torch.Tensor, gallery: torch.Tensor, query_groups: Sequence,
                    gallery_groups: Sequence, k: int = 10, **kw) -> SearchResult:
    """Rank of each query's best true item (same group id), with its top-k, in one chunked pass."""
    return search(queries, gallery, k, query_groups, gallery_groups, with_ranks=True, **kw)


def recall_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """{"R@K": fraction of ranked queries whose best true item is within the top K}."""
    valid = ranks[ranks >= 0]
    if len(valid) != len(ranks):
        raise ValueError(f"{len(ranks) - len(valid)} of {len(ranks)} queries have no true item in the gallery")
    if len(valid) == 0:
        raise ValueError("no queries to score")
    return {f"R@{k}": float((valid < k).float().mean()) for k in ks}


def recall_at_k(image_emb: torch.Tensor, image_study_ids: Sequence, text_emb: torch.Tensor,
                text_study_ids: Sequence, ks: Sequence[int] = (1, 5, 10), return_details: bool = False, **kw):
    """Study-level image<->report recall@K.

    image->report: every image is a query over the reports; correct when its study's report is
    in the top K. report->image: every report is a query over all images; correct when ANY image
    of its study is in the top K (the study's best-ranked image counts). Ties per ``ties`` (see
    the module docstring). Returns a JSON-able dict; with ``return_details`` also the two
    SearchResults {"image_to_text", "text_to_image"} (top max(ks) kept, for the CSV).
    """
    if len(image_emb) != len(image_study_ids) or len(text_emb) != len(text_study_ids):
        raise ValueError("each embedding needs exactly one study id")
    if len(text_emb) == 0 or len(image_emb) == 0:
        raise ValueError("recall needs at least one image and one report")
    k = max(ks)
    i2t = rank_of_targets(image_emb, text_emb, image_study_ids, text_study_ids, k=k, **kw)
    t2i = rank_of_targets(text_emb, image_emb, text_study_ids, image_study_ids, k=k, **kw)
    out = {"image_to_text": recall_from_ranks(i2t.ranks, ks), "text_to_image": recall_from_ranks(t2i.ranks, ks)}
    all_r = list(out["image_to_text"].values()) + list(out["text_to_image"].values())
    out["mean_recall"] = sum(all_r) / len(all_r)
    out["n_images"], out["n_reports"] = len(image_emb), len(text_emb)
    out["n_studies"] = len(set(text_study_ids) | set(image_study_ids))
    out["queries_with_ties"] = {"image_to_text": int((i2t.n_tied > 0).sum()),
                                "text_to_image": int((t2i.n_tied > 0).sum())}
    out["ties"] = kw.get("ties", "pessimistic")
    if return_details:
        return out, {"image_to_text": i2t, "text_to_image": t2i}
    return out


def recall_by_match(image_emb: torch.Tensor, image_study_ids: Sequence, text_emb: torch.Tensor,
                    text_study_ids: Sequence, texts: Sequence[str], match: str = "study",
                    ks: Sequence[int] = (1, 5, 10), return_details: bool = False, **kw):
    """`recall_at_k` at study level, text level (`normalize_report`), or both.

    The top-level keys are those of the first level asked for (study for "both"), so readers of
    study-level results keep working; `by_match` holds each level computed, `n_distinct_reports`
    the number of distinct normalised reports among the `n_reports`. `texts` are the reports,
    aligned with `text_study_ids`. With `return_details`, also {level: SearchResults}."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    if len(texts) != len(text_study_ids):
        raise ValueError(f"{len(texts)} report texts for {len(text_study_ids)} reports")
    norm = [normalize_report(t) for t in texts]
    levels = ["study", "text"] if match == "both" else [match]
    by, details = {}, {}
    for level in levels:
        if level == "study":
            qi, qt = image_study_ids, text_study_ids
        else:
            of_study = dict(zip(text_study_ids, norm))
            missing = [s for s in image_study_ids if s not in of_study]
            if missing:
                raise ValueError(f"{len(missing)} images belong to studies without a report (e.g. {missing[0]!r})")
            qi, qt = [of_study[s] for s in image_study_ids], norm
        by[level], details[level] = recall_at_k(image_emb, qi, text_emb, qt, ks=ks, return_details=True, **kw)
        if level == "text":
            by[level]["n_studies"] = len(set(text_study_ids) | set(image_study_ids))
    out = dict(by[levels[0]])
    out.update(match=match, n_distinct_reports=len(set(norm)), by_match=by)
    return (out, details) if return_details else out


def write_topk_csv(path, query_ids: Sequence, gallery_ids: Sequence, result: SearchResult,
                   query_groups: Optional[Sequence] = None, extra_ranks: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """One row per query: its id (and study), the 1-based rank of its best true item
    (``true_rank`` = rank + 1; empty where unknown), then the top-k gallery ids and scores.
    ``extra_ranks`` ({column: ranks}) adds more rank columns, e.g. ``true_rank_text``."""
    k = result.indices.shape[1]
    extra_ranks = extra_ranks or {}
    header = ["query_id"] + (["query_study"] if query_groups is not None else []) + ["true_rank"] + list(extra_ranks)
    header += [f"top{j + 1}_id" for j in range(k)] + [f"top{j + 1}_score" for j in range(k)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, qid in enumerate(query_ids):
            row = [qid] + ([query_groups[i]] if query_groups is not None else [])
            rank = int(result.ranks[i]) if result.ranks is not None else -1
            row.append(rank + 1 if rank >= 0 else "")
            row += [int(r[i]) + 1 if int(r[i]) >= 0 else "" for r in extra_ranks.values()]
            row += [gallery_ids[int(j)] if int(j) >= 0 else "" for j in result.indices[i]]
            row += [f"{float(s):.6f}" for s in result.scores[i]]
            w.writerow(row)
