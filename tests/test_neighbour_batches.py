"""`supcon.neighbour_batches`: TF-IDF neighbours (against scikit-learn), grouped epoch orders, and
`StepData` with and without groups."""
import random

import pytest
import torch

from open_clip_cxr_train import neighbour_batches as nb
from open_clip_cxr_train.stage1_data import StepData

TEXTS = [
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality. Lungs are clear.",
    "Small left pleural effusion. Heart size normal.",
    "Left pleural effusion, small. Normal heart size.",
    "No acute cardiopulmonary process.",                      # the same text as 0
    "Right upper lobe opacity concerning for pneumonia.",
    "Opacity in the right upper lobe, possibly pneumonia.",
    "Mild cardiomegaly without edema.",
]


def test_tfidf_matches_scikit_learn():
    text = pytest.importorskip("sklearn.feature_extraction.text")
    ref = text.TfidfVectorizer(lowercase=True, token_pattern=r"[a-z0-9]+", sublinear_tf=True,
                               smooth_idf=True, norm="l2").fit_transform(TEXTS)
    ours = nb.tfidf_matrix(TEXTS).to_dense()
    # both sort the vocabulary alphabetically, so the columns line up
    assert torch.allclose(ours, torch.tensor(ref.toarray(), dtype=torch.float32), atol=1e-6)


@pytest.mark.parametrize("dense_limit, chunk", [(10 ** 9, 256), (0, 3)])
def test_neighbours_rank_distinct_texts_by_cosine(monkeypatch, dense_limit, chunk):
    monkeypatch.setattr(nb, "DENSE_LIMIT", dense_limit)     # 0: the sparse product, in chunks of 3
    got = nb.lexical_neighbours(TEXTS, k=3, chunk=chunk)
    x = nb.tfidf_matrix(TEXTS).to_dense()
    sims = x @ x.t()
    for i, row in enumerate(got):
        texts = [TEXTS[j] for j in row]
        assert TEXTS[i] not in texts and len(set(texts)) == len(texts) == 3    # other texts, each once
        others = {TEXTS[j]: float(sims[i, j]) for j in range(len(TEXTS)) if TEXTS[j] != TEXTS[i]}
        assert [round(float(sims[i, j]), 5) for j in row] == [round(v, 5) for v in sorted(others.values())[::-1][:3]]
    assert got[2][0] == 3 and got[5][0] == 6
    assert got[1][0] == 0 and got[4][0] == 1                 # copies 0 and 4: the same neighbours


def test_copies_of_a_text_get_full_lists_and_spread_over_neighbour_copies():
    # a normal report 30 times word for word (Open-I's most common one has 43 copies in train)
    texts = ["No acute process."] * 30 + ["No acute cardiopulmonary process."] * 3 + TEXTS[2:4] + TEXTS[5:]
    got = nb.lexical_neighbours(texts, k=4)
    assert all(len(row) == 4 and len({texts[j] for j in row}) == 4 for row in got)
    firsts = [row[0] for row in got[:30]]
    assert {texts[j] for j in firsts} == {"No acute cardiopulmonary process."} and set(firsts) == {30, 31, 32}
    assert sorted(firsts) == [30] * 10 + [31] * 10 + [32] * 10                # each copy as often


def test_grouped_order_is_a_permutation_of_neighbour_runs():
    nbrs = nb.lexical_neighbours(TEXTS, k=3)
    order = nb.grouped_order(len(TEXTS), nbrs, 2, random.Random(0))
    assert sorted(order) == list(range(len(TEXTS)))
    assert order == nb.grouped_order(len(TEXTS), nbrs, 2, random.Random(0))
    # each run starts at a report and goes on with its neighbours: 2 and 3, 5 and 6 land side by side
    pos = {i: p for p, i in enumerate(order)}
    assert abs(pos[2] - pos[3]) == 1 and abs(pos[5] - pos[6]) == 1


def test_step_data_default_order_is_unchanged_and_grouped_batches_are_pure():
    n, bs = len(TEXTS), 4
    plain = StepData(n, bs, seed=3)
    assert [i for m in range(2) for _, i in plain(m)] == random.Random(3 * 1_000_003).sample(range(n), n)
    nbrs = nb.lexical_neighbours(TEXTS, k=3)
    a, b = StepData(n, bs, 3, neighbours=nbrs, group=2), StepData(n, bs, 3, neighbours=nbrs, group=2)
    assert [a(m) for m in (0, 1, 2, 3)] == [b(m) for m in (3, 2, 1, 0)][::-1]   # any call order, same batches
    assert sorted(i for m in (0, 1) for _, i in a(m)) == list(range(n))         # epoch 0: each report once
    assert {e for m in (2, 3) for e, _ in a(m)} == {1}
