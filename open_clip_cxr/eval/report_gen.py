"""Retrieval-based report generation: each test image gets the report(s) nearest to it in a bank.

The bank is usually the train split's reports. A query's own study is always excluded, so a
bank that overlaps the test set cannot leak the answer. With k > 1 the top-k distinct reports
are joined. The generated reports are scored against the study's real report with the offline
text metrics and, when a judge is given, GREEN.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from open_clip_cxr.eval.retrieval import search
from open_clip_cxr.eval.text_metrics import BertScorer, text_metrics


def retrieve_reports(query_emb: torch.Tensor, query_study_ids: Sequence, bank_emb: torch.Tensor,
                     bank_study_ids: Sequence, bank_texts: Sequence[str], k: int = 1, joiner: str = " ",
                     **search_kw) -> Tuple[List[str], List[List[str]]]:
    """(generated report per query, bank study ids used per query)."""
    if len(bank_emb) == 0:
        raise ValueError("the report bank is empty")
    if not (len(bank_emb) == len(bank_study_ids) == len(bank_texts)):
        raise ValueError("bank embeddings, study ids and texts must align")
    # fetch extra neighbours so that k distinct texts survive de-duplication
    res = search(query_emb, bank_emb, k=min(len(bank_emb), 4 * k), query_groups=query_study_ids,
                 gallery_groups=bank_study_ids, exclude_same_group=True, **search_kw)
    texts, used = [], []
    for row_s, row_i in zip(res.scores, res.indices):
        picked, ids, seen = [], [], set()
        for s, j in zip(row_s.tolist(), row_i.tolist()):
            if s == float("-inf") or len(picked) == k:
                break   # -inf: only the query's own study was left
            t = bank_texts[j].strip()
            if t not in seen:
                seen.add(t)
                picked.append(t)
                ids.append(str(bank_study_ids[j]))
        if not picked:
            raise ValueError("a query found no report outside its own study: the bank holds only that study")
        texts.append(joiner.join(picked))
        used.append(ids)
    return texts, used


def check_clinical_metrics(radgraph: Optional[str] = None, chexbert: bool = False) -> None:
    """Fail before any work when an asked-for RadGraph/CheXbert model is not on this machine."""
    from open_clip_cxr.eval import clinical_metrics as CM
    if radgraph:
        CM.check_radgraph(radgraph)
    if chexbert:
        CM.check_chexbert()


def evaluate_report_generation(generated: Sequence[str], references: Sequence[str],
                               bert_scorer: Optional[BertScorer] = None, judge=None, meteor: bool = True,
                               radgraph: Optional[str] = None, chexbert: bool = False, device: str = "cpu") -> dict:
    """{"metrics": text metrics (+ RadGraph/CheXbert F1 when asked, + "GREEN"), "green": judge summary, ...}.

    `radgraph`: a RadGraph model type ("radgraph", "radgraph-xl", ...) to add RadGraph-F1;
    `chexbert`: add CheXbert-F1. Both need their weights on disk (see clinical_metrics)."""
    out = {"metrics": text_metrics(generated, references, bert_scorer=bert_scorer, meteor=meteor),
           "n_reports": len(generated)}
    if radgraph or chexbert:
        from open_clip_cxr.eval import clinical_metrics as CM
        check_clinical_metrics(radgraph, chexbert)
        if radgraph:
            rg = CM.radgraph_f1(generated, references, model_type=radgraph, device=device)
            rg.pop("per_pair_partial")
            out["metrics"].update(rg)
        if chexbert:
            out["metrics"].update(CM.chexbert_f1(generated, references, device=device))
    if judge is not None:
        g = judge(references, generated)
        out["green"] = g["summary"]
        out["metrics"]["GREEN"] = g["summary"]["green"]
        out["metrics"]["GREEN_std"] = g["summary"].get("green_std")
        # outputs without GREEN's sections: scored 0 and averaged in, as GREEN's own code does
        out["metrics"]["GREEN_unparsed"] = g["summary"]["n_unparsed"]
        out["per_report_green"] = g["per_report"]
    return out
