"""Micro-batches of lexical neighbours (`supcon.neighbour_batches`).

With random batches a rewrite's own report competes against unrelated reports, which it beats on
any shared word; the held-out paraphrase and capitals rows fail instead on near-duplicate normal
reports ("No acute process." vs "Negative chest x-ray."). Grouping each report with its most
similar other training reports puts those near-duplicates into the same softmax, as in-batch
negatives, so the tower has to read the words that tell them apart.

`lexical_neighbours` ranks reports by TF-IDF cosine (no model, so the grouping does not move as
the tower trains); `grouped_order` turns it into one epoch's order: still a permutation (every
report once per epoch), made of runs of `group` neighbours.
"""
import math
import random
import re
from collections import Counter
from typing import List, Sequence

import torch

_WORD = re.compile(r"[a-z0-9]+")
DENSE_LIMIT = 50_000_000   # N x vocabulary cells under which the TF-IDF rows are sliced from a dense copy


def tfidf_matrix(texts: Sequence[str]) -> torch.Tensor:
    """Sparse [N, V] TF-IDF rows (sublinear counts, smoothed idf), L2-normalised."""
    counts = [Counter(_WORD.findall(t.lower())) for t in texts]
    vocab = {w: j for j, w in enumerate(sorted({w for c in counts for w in c}))}
    df = Counter(w for c in counts for w in c)
    idf = {w: math.log((1 + len(texts)) / (1 + df[w])) + 1 for w in vocab}
    rows, cols, vals = [], [], []
    for i, c in enumerate(counts):
        weights = {w: (1 + math.log(n)) * idf[w] for w, n in c.items()}
        norm = math.sqrt(sum(v * v for v in weights.values())) or 1.0
        for w, v in weights.items():
            rows.append(i)
            cols.append(vocab[w])
            vals.append(v / norm)
    return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1),
                                   torch.tensor(vals, dtype=torch.float32), (len(texts), max(1, len(vocab))),
                                   check_invariants=True).coalesce()


def lexical_neighbours(texts: Sequence[str], k: int, chunk: int = 256) -> List[List[int]]:
    """Per text, `k` indices of its most similar OTHER texts by TF-IDF cosine, best first, one per
    distinct text. Ranked over distinct texts: a normal report can have dozens of word-for-word
    copies, which are the same report to the loss (its keys mask them) and would fill the list.
    Copies of a text take different copies of each neighbour, so none is drawn every time.
    Memory: (distinct texts) x `chunk` similarities at a time."""
    n = len(texts)
    if n == 0 or k <= 0:
        return [[] for _ in range(n)]
    copies: dict = {}        # text -> its items, in order; the keys are the distinct texts
    for i, t in enumerate(texts):
        copies.setdefault(t, []).append(i)
    distinct = list(copies)
    u = len(distinct)
    x = tfidf_matrix(distinct)
    dense = x.to_dense() if u * x.shape[1] <= DENSE_LIMIT else None   # only to slice rows from
    ranked: List[List[int]] = []
    for s in range(0, u, chunk):
        block = dense[s:s + chunk] if dense is not None else \
            x.index_select(0, torch.arange(s, min(u, s + chunk))).to_dense()
        sims = torch.sparse.mm(x, block.t()).t()     # sparse x dense: the rows are short
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + s] = -2.0    # not itself
        ranked += torch.topk(sims, min(u - 1, k), dim=1).indices.tolist()
    out: List[List[int]] = [[] for _ in range(n)]
    for t, nbrs in zip(distinct, ranked):
        for c, i in enumerate(copies[t]):   # the c-th copy of a text takes the c-th copy of each neighbour
            out[i] = [copies[distinct[j]][c % len(copies[distinct[j]])] for j in nbrs]
    return out


def grouped_order(n: int, neighbours: Sequence[Sequence[int]], group: int, rng: random.Random) -> List[int]:
    """One epoch's order: reports in a random order, each followed by up to `group` - 1 of its
    neighbours not yet placed. A permutation of range(n), so an epoch still reads every report once."""
    placed = bytearray(n)
    order: List[int] = []
    for i in rng.sample(range(n), n):
        if placed[i]:
            continue
        placed[i] = 1
        order.append(i)
        taken = 1
        for j in neighbours[i]:
            if taken >= group:
                break
            if not placed[j]:
                placed[j] = 1
                order.append(j)
                taken += 1
    return order
