"""Chunked retrieval against a brute-force reference: ranks, ties, multi-image studies, recall@K."""
import csv

import pytest
import torch

from open_clip_cxr.eval import retrieval as R


def _norm(x):
    return torch.nn.functional.normalize(x, dim=-1)


def brute_ranks(q, g, qg, gg, ties="pessimistic", tol=1e-6):
    """Full score matrix: rank = non-true items above the best true one (+ ties if pessimistic)."""
    s = q.float() @ g.float().T
    true = torch.tensor([[a == b for b in gg] for a in qg])
    best = torch.where(true, s, torch.tensor(-float("inf"))).max(1).values
    above = ((s > best[:, None] + tol) & ~true).sum(1)
    tied = (((s - best[:, None]).abs() <= tol) & ~true).sum(1)
    ranks = above + (tied if ties == "pessimistic" else 0)
    ranks[~true.any(1)] = -1
    return ranks, tied


@pytest.fixture
def data():
    """Random embeddings with exact duplicates (ties) and studies of 1-3 images."""
    g = torch.Generator().manual_seed(0)
    n_studies, d = 60, 12
    text = _norm(torch.randn(n_studies, d, generator=g))
    text[7] = text[3]                      # two studies with the same report: a tie for both
    text[20:23] = text[40]
    n_img = torch.randint(1, 4, (n_studies,), generator=g)
    img_study = [f"s{i}" for i in range(n_studies) for _ in range(int(n_img[i]))]
    img = _norm(torch.stack([text[int(s[1:])] + 0.9 * torch.randn(d, generator=g) for s in img_study]))
    img[5] = img[6]                        # duplicate images
    return img, img_study, text, [f"s{i}" for i in range(n_studies)]


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("chunks", [(7, 5), (1, 1000), (1000, 3)])
def test_ranks_match_brute_force(data, ties, chunks):
    img, img_study, text, text_study = data
    for q, g, qg, gg in [(img, text, img_study, text_study), (text, img, text_study, img_study)]:
        ref, ref_tied = brute_ranks(q, g, qg, gg, ties)
        res = R.rank_of_targets(q, g, qg, gg, k=4, chunk_size=chunks[0], gallery_chunk_size=chunks[1], ties=ties)
        assert torch.equal(res.ranks, ref)
        assert torch.equal(res.n_tied, ref_tied)
    assert int(ref_tied.sum()) > 0, "the fixture is meant to contain ties"


def test_ties_count_against_pessimistic_only():
    q = _norm(torch.tensor([[1.0, 0.2]]))
    g = torch.cat([q, q, q])               # the true item and two identical impostors
    pes = R.rank_of_targets(q, g, ["a"], ["a", "b", "c"])
    opt = R.rank_of_targets(q, g, ["a"], ["a", "b", "c"], ties="optimistic")
    assert pes.ranks.tolist() == [2] and opt.ranks.tolist() == [0] and pes.n_tied.tolist() == [2]


def test_float16_storage_matches_reference_on_stored_values(data):
    img, img_study, text, text_study = data
    ref, _ = brute_ranks(img.half(), text.half(), img_study, text_study)
    res = R.rank_of_targets(img, text, img_study, text_study, storage_dtype=torch.float16, chunk_size=9)
    assert torch.equal(res.ranks, ref)


def test_chunked_topk_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    q, gal = _norm(torch.randn(50, 16, generator=g)), _norm(torch.randn(333, 16, generator=g))
    full_s, full_i = (q @ gal.T).topk(10, dim=1)
    for cs, gcs in [(1, 7), (13, 64), (50, 333), (64, 1000)]:
        s, i = R.chunked_topk(q, gal, 10, chunk_size=cs, gallery_chunk_size=gcs)
        assert torch.allclose(s, full_s, atol=1e-6)
        assert torch.equal(i, full_i)


def test_topk_larger_than_gallery_and_dim_errors():
    q, g = _norm(torch.randn(3, 4)), _norm(torch.randn(2, 4))
    s, i = R.chunked_topk(q, g, 10)
    assert s.shape == (3, 2) and sorted(i[0].tolist()) == [0, 1]
    with pytest.raises(ValueError, match="dim"):
        R.chunked_topk(q, torch.randn(2, 5), 1)
    with pytest.raises(ValueError, match="empty"):
        R.chunked_topk(q, torch.zeros(0, 4), 1)


def test_recall_at_k_study_level(data):
    img, img_study, text, text_study = data
    out, det = R.recall_at_k(img, img_study, text, text_study, ks=(1, 5), return_details=True,
                             chunk_size=11, gallery_chunk_size=13)
    i2t, _ = brute_ranks(img, text, img_study, text_study)
    t2i, _ = brute_ranks(text, img, text_study, img_study)
    assert out["image_to_text"]["R@1"] == pytest.approx(float((i2t < 1).float().mean()))
    assert out["image_to_text"]["R@5"] == pytest.approx(float((i2t < 5).float().mean()))
    assert out["text_to_image"]["R@5"] == pytest.approx(float((t2i < 5).float().mean()))
    assert out["mean_recall"] == pytest.approx(sum(list(out["image_to_text"].values()) + list(out["text_to_image"].values())) / 4)
    assert out["n_images"] == len(img_study) and out["n_reports"] == len(text_study)
    assert det["text_to_image"].indices.shape == (len(text_study), 5)
    import json
    json.dumps(out)


def test_report_to_image_counts_any_image_of_the_study():
    # study A has two images; its report matches the second one best
    text = _norm(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    img = _norm(torch.tensor([[0.3, 1.0], [1.0, 0.05], [0.1, 1.0]]))
    out = R.recall_at_k(img, ["A", "A", "B"], text, ["A", "B"], ks=(1,))
    assert out["text_to_image"]["R@1"] == 1.0
    assert out["image_to_text"]["R@1"] == pytest.approx(2 / 3)   # image 0 of A looks like B's report


def test_query_without_match():
    q, g = _norm(torch.randn(2, 4)), _norm(torch.randn(3, 4))
    res = R.rank_of_targets(q, g, ["x", "a"], ["a", "b", "c"])
    assert res.ranks[0] == -1 and res.ranks[1] >= 0
    with pytest.raises(ValueError, match="no true item"):
        R.recall_from_ranks(res.ranks)


def test_exclude_same_group_hides_own_study():
    q = _norm(torch.randn(5, 8))
    g = torch.cat([q, _norm(torch.randn(4, 8))])
    groups = list("abcde")
    s, i = R.chunked_topk(q, g, 3, query_groups=groups, gallery_groups=groups + list("fghi"),
                          exclude_same_group=True, gallery_chunk_size=3)
    assert all(r not in row for r, row in enumerate(i.tolist()))
    assert s.isfinite().all()
    s, i = R.chunked_topk(q[:1], q[:2], 2, query_groups=["a"], gallery_groups=["a", "b"], exclude_same_group=True)
    assert i.tolist() == [[1, -1]] and s[0, 1] == float("-inf")   # only one item is not excluded
    with pytest.raises(ValueError, match="exclusive"):
        R.search(q, g, 1, groups, groups + list("fghi"), with_ranks=True, exclude_same_group=True)


def test_threshold_drift_triggers_exact_rescan(data, monkeypatch):
    """If the pre-computed best-true score is off by more than the band, rows are rescanned."""
    img, img_study, text, text_study = data
    ref, _ = brute_ranks(img, text, img_study, text_study)
    real = R._pair_scores
    monkeypatch.setattr(R, "_pair_scores", lambda *a, **k: real(*a, **k) + 0.05)
    res = R.rank_of_targets(img, text, img_study, text_study, chunk_size=16)
    assert torch.equal(res.ranks, ref)


def test_write_topk_csv(tmp_path, data):
    img, img_study, text, text_study = data
    res = R.rank_of_targets(text, img, text_study, img_study, k=3)
    keys = [f"img{i}" for i in range(len(img_study))]
    path = tmp_path / "t2i.csv"
    R.write_topk_csv(path, text_study, keys, res, text_study)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == len(text_study)
    assert rows[0].keys() >= {"query_id", "query_study", "true_rank", "top1_id", "top3_score"}
    for row, rank, idx in zip(rows, res.ranks.tolist(), res.indices.tolist()):
        assert int(row["true_rank"]) == rank + 1
        assert row["top1_id"] == keys[idx[0]]
