"""Stage 1 (training/text_stage.py, mntp.py, supcon.py) on `cxr-llm-tiny` (random, ~240k params), CPU.

Reports are hand-written here (no Open-I text); variants come from `reports.variants`.
"""
import json
import random
import tarfile
import io
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import data_fixtures as fx
from open_clip_cxr.reports.types import Report
from open_clip_cxr_train import common
from open_clip_cxr_train.mntp import (IGNORE, LORA_TARGETS, mask_tokens, mntp_loss, resolve_mask_token_id, shift_for_next_token,
                           special_token_ids)
from open_clip_cxr_train.supcon import Embedder, length_chunks, make_example, supcon_loss, text_key

ROOT = Path(__file__).resolve().parents[1]
# the shared hand-written reports, plus two with right-sided findings (more laterality negatives)
REPORTS = fx.REPORTS + [
    ("Moderate right pleural effusion. The left lung is clear. Normal heart size.",
     "Moderate right pleural effusion."),
    ("Large right pneumothorax with leftward mediastinal shift.",
     "Large right tension pneumothorax."),
]


def reports(split="train"):
    return [Report(study_id=f"s{i}", source="test", findings=f, impression=im, text=f"{f} {im}", split=split)
            for i, (f, im) in enumerate(REPORTS)]


pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")   # conftest.py


@pytest.fixture()
def tiny_tower():
    import open_clip
    import open_clip_cxr  # noqa: F401
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("cxr-llm-tiny")
    return model.text.transformer, open_clip.get_tokenizer("cxr-llm-tiny")


def write_table(path: Path, n_val: int = 4) -> Path:
    """A JSONL export: the hand-written reports as train rows, the first `n_val` again as validation."""
    rows = [{"study": f"s{i}", "findings": f, "impression": im, "split": "train"} for i, (f, im) in enumerate(REPORTS)]
    rows += [{"study": f"v{i}", "findings": f, "impression": im, "split": "validate"}
             for i, (f, im) in enumerate(REPORTS[:n_val])]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def tiny_recipe(tmp_path: Path, **over) -> dict:
    recipe = common.load_recipe(str(ROOT / "training/recipes/text-cxr-llm-small-cpu.yaml"), [
        "model=cxr-llm-tiny", "max_length=96",
        "train.log_with=none", "train.log_every=1", "train.checkpoint_every=2", "train.num_threads=1",
        "mntp.steps=2", "mntp.batch_size=4", "supcon.steps=2", "supcon.batch_size=4", "supcon.warmup_steps=1",
        "eval.enabled=true"])
    # the CPU recipe trains the pooler alone; the tests also cover LoRA in the top layer
    recipe["supcon"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0,
                                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "layers": 1}
    recipe["data"] = {"source": "table", "path": str(write_table(tmp_path / "reports.jsonl")),
                      "findings_col": "findings", "impression_col": "impression", "study_col": "study",
                      "split_col": "split"}
    recipe["output_dir"] = str(tmp_path / "stage1")
    for k, v in over.items():
        common.set_by_path(recipe, k, v)
    return recipe


# ---------------------------------------------------------------- MNTP

def test_mask_token_ids_exist_in_both_tokenizers():
    import open_clip
    import open_clip_cxr  # noqa: F401
    small = open_clip.get_tokenizer("cxr-llm-small")
    assert resolve_mask_token_id(small, "_") == small.tokenizer.convert_tokens_to_ids("_")
    # a token the vocabulary lacks falls back to unk (SmolLM2 has no mask token)
    assert resolve_mask_token_id(small, "<no-such-token>") == small.tokenizer.unk_token_id
    tiny = open_clip.get_tokenizer("cxr-llm-tiny")
    assert resolve_mask_token_id(tiny, "_") != tiny.tokenizer.pad_token_id


def test_mask_tokens_masks_the_right_fraction_and_never_specials():
    torch.manual_seed(0)
    specials = torch.tensor([0, 1, 2])
    ids = torch.randint(10, 100, (6, 40))
    ids[:, 0] = 1                        # a BOS-like special
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[3:, 25:] = False                # right padding
    ids[~mask] = 0
    masked, labels = mask_tokens(ids, mask, mask_id=7, special_ids=specials, prob=0.2,
                                 generator=torch.Generator().manual_seed(0))
    chosen = labels != IGNORE
    # maskable: real, not special, not the first real token (it has no position i-1)
    maskable = mask & ~torch.isin(ids, specials)
    maskable[:, 0] = False
    n = maskable.sum(1)
    assert chosen.sum(1).tolist() == (n.float() * 0.2).round().long().tolist()
    assert not (chosen & ~maskable).any()
    assert (masked[chosen] == 7).all() and (labels[chosen] == ids[chosen]).all()
    assert (masked[~chosen] == ids[~chosen]).all()


def test_next_token_alignment_on_a_constructed_example():
    # states that encode their position; label at position 3 must be read from state 2
    hidden = torch.arange(10).float().view(1, 10, 1).expand(2, 10, 4)
    labels = torch.full((2, 10), IGNORE)
    labels[0, 3], labels[1, 7] = 42, 43
    states, targets = shift_for_next_token(hidden, labels)
    assert states[:, 0].tolist() == [2.0, 6.0] and targets.tolist() == [42, 43]


class _OracleTower(nn.Module):
    """A fake tower whose state at i is the (scaled, orthonormal) embedding of `future[i]`."""

    def __init__(self, vocab=16, shift=1):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)
        self.emb.weight.data = torch.eye(vocab)
        self.shift, self.true_ids = shift, None

    def base_llm(self):
        return self

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask):
        nxt = torch.roll(self.true_ids, -self.shift, dims=1)   # state i "knows" token i + shift
        return type("Out", (), {"last_hidden_state": 30.0 * self.emb(nxt)})()


def test_mntp_loss_predicts_i_from_i_minus_1():
    torch.manual_seed(0)
    ids = torch.randint(3, 16, (3, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    masked, labels = mask_tokens(ids, mask, mask_id=0, prob=0.3, generator=torch.Generator().manual_seed(1))
    right, wrong = _OracleTower(shift=1), _OracleTower(shift=0)
    right.true_ids = wrong.true_ids = ids
    assert mntp_loss(right, masked, mask, labels) < 1e-3       # state i-1 holds token i: perfect
    assert mntp_loss(wrong, masked, mask, labels) > 5.0        # reading state i instead fails


def test_mntp_overfits_one_batch(tiny_tower):
    from open_clip_cxr_train.text_stage import MNTPModel, set_lora
    tower, tok = tiny_tower
    set_lora(tower, {"r": 8, "alpha": 16, "dropout": 0.0})
    texts = [f for f, _ in REPORTS[:4]]
    ids = tok(texts, context_length=96)
    mask = ids != tower.config.pad_token_id
    masked, labels = mask_tokens(ids, mask, resolve_mask_token_id(tok), special_token_ids(tok), 0.2,
                                 torch.Generator().manual_seed(0))
    model = MNTPModel(tower, 4096)
    opt = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(masked, mask, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]     # LoRA alone on a random decoder: slow, but falling


# ---------------------------------------------------------------- supervised contrastive

def test_supcon_loss_lower_when_positives_are_aligned():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    aligned = supcon_loss(a, a + 0.05 * torch.randn(8, 16))
    shuffled = supcon_loss(a, (a + 0.05 * torch.randn(8, 16))[torch.randperm(8)])
    assert aligned < 0.1 < shuffled
    # a hard negative that sits on the anchor raises the loss
    hard = supcon_loss(a, a + 0.3 * torch.randn(8, 16), negatives=a.clone())
    easy = supcon_loss(a, a + 0.3 * torch.randn(8, 16), negatives=-a)
    assert hard > easy


def test_supcon_masks_identical_texts_and_padding():
    torch.manual_seed(0)
    a, p = torch.randn(4, 8), torch.randn(4, 8)
    p[1] = p[0]                                        # pairs 0 and 1 share the positive text
    keys_a = torch.tensor([text_key(t) for t in ["a", "b", "c", "d"]])
    keys_p = torch.tensor([text_key(t) for t in ["x", "X ", "y", "z"]])   # same after normalisation
    masked = supcon_loss(a, p, anchor_keys=keys_a, positive_keys=keys_p)
    # by hand: anchor 0 never sees positive 1 as a negative (nor 1 sees 0)
    logits = nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(p, dim=-1).T / 0.05
    logits[0, 1] = logits[1, 0] = float("-inf")
    assert torch.allclose(masked, nn.functional.cross_entropy(logits, torch.arange(4)), atol=1e-5)
    # padded negative rows (valid=False) change nothing
    neg = torch.randn(8, 8)
    valid = torch.tensor([True, False] * 4)
    assert torch.allclose(supcon_loss(a, p, neg, negative_valid=valid), supcon_loss(a, p, neg[valid]), atol=1e-6)


def _supcon_inputs(world=2, b=3, h=2, d=8):
    """Every rank's anchors, positives, hard negatives (+ valid flags) and text keys, made alike on
    each rank; rank 1's positive 0 is the same text as rank 0's positive 1 (masked across ranks)."""
    g = torch.Generator().manual_seed(0)
    a, p, n = torch.randn(world * b, d, generator=g), torch.randn(world * b, d, generator=g), \
        torch.randn(world * h, d, generator=g)
    valid = torch.tensor([True, False] * (world * h // 2))
    ak, pk = torch.arange(100, 100 + world * b), torch.arange(200, 200 + world * b)
    pk[b] = pk[1]
    return a, p, n, valid, ak, pk


def _supcon_rank(rank, world, port, out):
    import os
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    a, p, n, valid, ak, pk = _supcon_inputs(world)
    b, h = a.shape[0] // world, n.shape[0] // world
    mine = [x[rank * b:(rank + 1) * b].clone().requires_grad_(True) for x in (a, p)]
    neg = n[rank * h:(rank + 1) * h].clone().requires_grad_(True)
    loss = supcon_loss(mine[0], mine[1], neg, 0.05, ak[rank * b:(rank + 1) * b], pk[rank * b:(rank + 1) * b],
                       valid[rank * h:(rank + 1) * h], symmetric=True)
    loss.backward()
    torch.save({"loss": loss.item(), "grads": [mine[0].grad, mine[1].grad, neg.grad]}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_supcon_across_two_processes_equals_one_process(tmp_path):
    """Two gloo processes, each with half of the pairs and hard negatives: the mean of their losses
    is the one-process loss on the whole batch, and each process's gradients (summed over both
    losses by the all-gather) are twice the one-process gradient of its rows."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_supcon_rank, args=(2, port, str(tmp_path / "rank")), nprocs=2)
    a, p, n, valid, ak, pk = [x.clone() for x in _supcon_inputs(2)]
    for x in (a, p, n):
        x.requires_grad_(True)
    loss = supcon_loss(a, p, n, 0.05, ak, pk, valid, symmetric=True)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank.{r}", weights_only=True) for r in range(2)]
    assert sum(r["loss"] for r in ranks) / 2 == pytest.approx(loss.item(), abs=1e-5)
    for i, full in enumerate((a.grad, p.grad, n.grad)):
        torch.testing.assert_close(torch.cat([r["grads"][i] for r in ranks]) / 2, full, atol=1e-6, rtol=1e-4)
    # the cross-process duplicate really is masked: without keys the loss differs
    assert supcon_loss(a, p, n, 0.05, None, None, valid, symmetric=True).item() != pytest.approx(loss.item(), abs=1e-4)


def test_make_example_pairs_and_hard_negatives():
    r = reports()[2]
    tasks = set()
    for seed in range(30):
        ex = make_example(r, random.Random(seed), seed=seed, p_sections=0.5, n_negatives=2)
        tasks.add(ex.task)
        assert ex.anchor != ex.positive and len(ex.negatives) <= 2
        assert all(n not in (ex.anchor, ex.positive) for n in ex.negatives)
        if ex.task == "impression->findings":
            assert (ex.anchor, ex.positive) == (r.impression, r.findings)
    assert tasks == {"variant", "impression->findings", "findings->impression"}
    assert make_example(Report(study_id="e", source="t"), random.Random(0)) is None


def test_length_chunks_cover_everything_within_budget():
    lengths = [5, 50, 7, 49, 100, 3, 0]
    chunks = length_chunks(lengths, max_tokens=100)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert all(len(c) * max(lengths[i] for i in c) <= 100 or len(c) == 1 for c in chunks)


def test_embedder_chunks_equal_one_batch(tiny_tower):
    tower, tok = tiny_tower
    tower.eval()
    ids = tok([f for f, _ in REPORTS], context_length=96)
    pad = tower.config.pad_token_id
    whole = tower(input_ids=ids, attention_mask=ids != pad).pooler_output
    chunked = Embedder(tower, pad, max_tokens=100)(ids)
    assert torch.allclose(whole, chunked, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_cached_lower_layers_embed_like_the_whole_tower(tiny_tower, k):
    from open_clip_cxr_train.supcon import CachedEmbedder, TextStateCache
    from open_clip_cxr_train.text_stage import set_lora
    tower, tok = tiny_tower
    if k:
        set_lora(tower, {"r": 4, "alpha": 8, "dropout": 0.0, "layers": k})
        for name, p in tower.named_parameters():   # non-zero LoRA, so the top layers differ from the base
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    tower.eval()
    texts = [f for f, _ in REPORTS] + [im for _, im in REPORTS]
    cache = TextStateCache(tower, tok, texts, k, max_length=96, max_tokens=200)
    with torch.no_grad():
        whole = Embedder(tower, tower.config.pad_token_id)(tok(texts, context_length=96))
        cached = CachedEmbedder(tower, cache, max_tokens=200)(cache.rows(texts[::-1]))
    # the cache is computed under bf16 autocast and stored in bf16: equal up to that rounding
    cos = nn.functional.cosine_similarity(whole.flip(0), cached, dim=-1)
    assert cos.min() > 0.999


def test_pooler_only_step_embeds_the_same_in_one_call_or_many(tiny_tower, monkeypatch):
    """k=0: the pooler runs the whole step in one packed call; chunking must not change a vector."""
    from open_clip_cxr_train import text_embed
    tower, tok = tiny_tower
    tower.eval()
    texts = [f for f, _ in REPORTS] + [im for _, im in REPORTS]
    cache = text_embed.TextStateCache(tower, tok, texts, 0, max_length=96, max_tokens=200)
    rows = cache.rows(texts)
    with torch.no_grad():
        one = text_embed.CachedEmbedder(tower, cache, max_tokens=50)(rows)
        monkeypatch.setattr(text_embed, "POOLER_TOKENS_PER_CALL", 40)
        many = text_embed.CachedEmbedder(tower, cache, max_tokens=50)(rows)
    assert torch.allclose(one, many, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_contrastive_step_flops_match_a_flop_counter(tiny_tower, k):
    """The MFU of the step lines: the per-token count against torch's FlopCounterMode over a real
    forward + backward of the cached step (attention in its math form, which the counter sees).
    Short texts: decoder attention's T^2 term, which the count leaves out, stays a few percent."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from open_clip_cxr_train import text_embed
    from open_clip_cxr_train.stage1_model import contrastive_flops_per_token, set_lora
    tower, tok = tiny_tower
    tower.requires_grad_(False)
    if k:
        set_lora(tower, {"r": 4, "alpha": 8, "dropout": 0.0, "layers": k})
    for m in (tower.pooler, tower.norm):
        m.requires_grad_(True)
    texts = [f"No effusion {i}." for i in range(24)]
    cache = text_embed.TextStateCache(tower, tok, texts, k, max_length=96, max_tokens=400)
    rows = cache.rows(texts)
    tokens = sum(cache.states[i].shape[0] for i in rows.tolist())
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        text_embed.CachedEmbedder(tower, cache, max_tokens=400)(rows).sum().backward()
    counted = counter.get_total_flops()
    if not k:   # nothing below the pooler trains: autograd skips `to_q`'s input gradient, the count keeps it
        counted += 2 * tower.pooler.to_q.weight.numel() * tokens
    assert contrastive_flops_per_token(tower, k, k) * tokens == pytest.approx(counted, rel=0.05)


def test_mntp_step_flops_match_a_flop_counter(tiny_tower):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from open_clip_cxr_train.stage1_model import mntp_flops_per_token, set_lora
    tower, tok = tiny_tower
    tower.requires_grad_(False)
    set_lora(tower, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": LORA_TARGETS})
    ids = tok([f"No effusion {i}." for i in range(24)], context_length=20)
    mask = ids != tower.config.pad_token_id
    labels = torch.where((torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3) & mask, ids, IGNORE)
    masked, tokens = int((labels[:, 1:] != IGNORE).sum()), int(mask.sum())
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        mntp_loss(tower, ids, mask, labels).backward()
    assert mntp_flops_per_token(tower, masked / tokens) * tokens == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_token_dropout_hides_tokens_in_training_only(tiny_tower):
    from open_clip_cxr_train import text_embed
    keep = torch.tensor([[True] * 40 + [False] * 10, [True] + [False] * 49])
    torch.manual_seed(0)
    dropped = text_embed.drop_tokens(keep, 0.5)
    assert not (dropped & ~keep).any()                     # a pad token is never brought back
    assert 8 < int(dropped[0].sum()) < 32                  # about half of the 40 real tokens
    assert dropped.any(1).all()                            # no text loses every token
    cue = torch.zeros_like(keep)
    cue[0, :5] = True
    assert text_embed.drop_tokens(keep, 0.99, cue)[0, :5].all()   # cue tokens are never hidden
    tower, tok = tiny_tower
    texts = [f for f, _ in REPORTS]
    cache = text_embed.TextStateCache(tower, tok, texts, 0, max_length=96, max_tokens=200)
    emb = text_embed.CachedEmbedder(tower, cache, max_tokens=50, token_dropout=0.5)
    rows = cache.rows(texts)
    with torch.no_grad():
        a, b = emb.eval()(rows), emb(rows)
        assert torch.equal(a, b)                           # evaluation sees every token
        c, d = emb.train()(rows), emb(rows)
    assert not torch.allclose(c, d)                        # training draws a new subset each call


def test_cue_tokens_are_the_negation_side_and_severity_words():
    import open_clip
    from open_clip_cxr_train.text_embed import cue_token_mask
    tok = open_clip.get_tokenizer("cxr-llm-small")
    mask = cue_token_mask(tok)
    hf = tok.tokenizer
    ids = hf("No left effusion, not seen without mild edema. heart lungs")["input_ids"]
    cue = {w.lstrip("\u0120") for w, i in zip(hf.convert_ids_to_tokens(ids), ids) if mask[i]}
    assert cue == {"No", "left", "not", "without", "mild"}


def test_token_dropout_needs_cached_texts(tmp_path):
    from open_clip_cxr_train.recipe_check import RecipeError, check_before_work
    with pytest.raises(RecipeError, match="token_dropout. works on cached texts"):
        check_before_work(tiny_recipe(tmp_path, **{"supcon.token_dropout": 0.1, "supcon.cache": False}), "text")


def test_supcon_overfits_one_batch(tiny_tower):
    from open_clip_cxr_train.text_stage import set_lora
    tower, tok = tiny_tower
    set_lora(tower, {"r": 8, "alpha": 16, "dropout": 0.0})
    for m in (tower.pooler, tower.norm):
        m.requires_grad_(True)
    rng = random.Random(0)
    exs = [make_example(r, rng, seed=0, p_sections=0.3, n_negatives=1) for r in reports()]
    ids = tok([e.anchor for e in exs] + [e.positive for e in exs], context_length=96)
    emb = Embedder(tower, tower.config.pad_token_id)
    opt = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        out = emb(ids)
        loss = supcon_loss(out[:8], out[8:], temperature=0.05, symmetric=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_lora_targets_limited_to_top_layers(tiny_tower):
    from open_clip_cxr_train.text_stage import lora_targets, set_lora
    tower, _ = tiny_tower
    names = lora_targets(tower, {"target_modules": ["q_proj", "v_proj"], "layers": 1})
    assert names and all(".layers.1." in "." + n for n in names) and len(names) == 2
    set_lora(tower, {"target_modules": ["q_proj", "v_proj"], "layers": 1})
    lora = [n for n, p in tower.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all("layers.1." in n for n in lora)


# ---------------------------------------------------------------- the stage end to end

def test_train_end_to_end_exports_a_loadable_folder(tmp_path):
    import open_clip
    from open_clip_cxr_train.text_stage import train, tower_encode_fn
    recipe = tiny_recipe(tmp_path)
    summary = train(recipe)
    out = Path(recipe["output_dir"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_stage = {s: [r["step"] for r in rows if r["stage"] == s and "loss_mean" not in r] for s in ("mntp", "supcon")}
    assert per_stage == {"mntp": [1, 2], "supcon": [3, 4]}
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in rows)
    assert summary["eval"]["n_reports"] == 4 and (out / "eval.json").exists()

    # the folder loads through OpenCLIP and embeds like the tower that was trained
    common.reset_accelerator_state()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    tower = model.text.transformer
    assert not tower.has_lora and tower.config.lora is None
    emb = tower_encode_fn(tower, tok, dtype=None)([f for f, _ in REPORTS[:3]])
    assert emb.shape == (3, tower.config.hidden_size) and torch.isfinite(emb).all()
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved) >= {"variant_to_original", "impression_to_findings_R@1", "error_discrimination"}


@pytest.mark.parametrize("lora", [{"layers": 1}, None])
def test_train_cached_supcon(tmp_path, lora):
    from open_clip_cxr_train.text_stage import train
    recipe = tiny_recipe(tmp_path, **{"supcon.cache": True, "supcon.cache_reports": 6, "supcon.steps": 3,
                                      "supcon.lora": lora and {**lora, "r": 4, "alpha": 8}, "eval.enabled": False})
    train(recipe)
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "supcon" and "loss_mean" not in r] == [3, 4, 5]


def test_train_cached_supcon_with_token_dropout(tmp_path):
    from open_clip_cxr_train.text_stage import train
    recipe = tiny_recipe(tmp_path, **{"supcon.cache": True, "supcon.cache_reports": 6, "supcon.steps": 2,
                                      "supcon.lora": None, "supcon.token_dropout": 0.2, "eval.enabled": False})
    train(recipe)
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "supcon" and "loss_mean" not in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))   # two steps through the dropout path


def test_train_cached_supcon_with_borrowed_errors(tmp_path, capsys, monkeypatch):
    from open_clip_cxr_train import stage1_supcon
    from open_clip_cxr_train.text_stage import train
    asked = []
    real = stage1_supcon.report_texts
    monkeypatch.setattr(stage1_supcon, "report_texts", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    recipe = tiny_recipe(tmp_path, **{"supcon.cache": True, "supcon.cache_reports": 6, "supcon.steps": 2,
                                      "supcon.lora": None, "supcon.borrowed_insertions": 1, "supcon.borrowed_negations": 1,
                                      "supcon.borrowed_absent_swaps": 1, "supcon.borrowed_rewordings": 1, "supcon.laterality_copies": 2, "supcon.context_lines_p": 0.5, "eval.enabled": False})
    train(recipe)
    assert asked and all(kw["context_lines_p"] == 0.5 and kw["laterality_copies"] == 2 for kw in asked)
    line = next(x for x in capsys.readouterr().out.splitlines() if "borrowed errors" in x)
    assert int(line.split(": ")[2].split()[0]) > 0, line       # the pool found sentences to borrow
    assert line.endswith("1 insertion, 1 negation, 1 absent-swap copies; 1 reworded-negation rewrites"), line
    assert all(kw["borrowed"].absent_swaps == kw["borrowed"].rewordings == 1 for kw in asked)
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["stage"] == "supcon" and "loss_mean" not in r]) == 2


@pytest.mark.parametrize("cache", [True, False])
def test_train_supcon_with_neighbour_batches(tmp_path, monkeypatch, cache):
    """Both data paths hand the report texts to the grouping, and training runs on grouped batches."""
    from open_clip_cxr_train import neighbour_batches
    from open_clip_cxr_train.text_stage import train
    seen, real = {}, neighbour_batches.lexical_neighbours
    monkeypatch.setattr(neighbour_batches, "lexical_neighbours",
                        lambda texts, k: seen.update(texts=list(texts), k=k) or real(texts, k))
    recipe = tiny_recipe(tmp_path, **{"supcon.cache": cache, "supcon.cache_reports": 6, "supcon.steps": 2,
                                      "supcon.lora": None, "supcon.neighbour_batches": 2, "eval.enabled": False})
    train(recipe)
    assert seen["k"] == 4 and len(seen["texts"]) == (6 if cache else len(REPORTS))
    assert all(t.strip() for t in seen["texts"])        # each item's report text, none empty
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "supcon" and "loss_mean" not in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_pooler_head_steps_come_before_lora(tmp_path):
    from open_clip_cxr_train.text_stage import train
    recipe = tiny_recipe(tmp_path, **{"supcon.cache": True, "supcon.head_steps": 2, "supcon.steps": 2,
                                      "eval.enabled": False})
    train(recipe)
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    stages = [(r["step"], r["stage"]) for r in rows if "loss_mean" not in r]
    assert stages == [(1, "mntp"), (2, "mntp"), (3, "supcon_head"), (4, "supcon_head"), (5, "supcon"), (6, "supcon")]
    assert "lr_head" not in rows[2] and "lr_head" in rows[-1]   # the head stage has one group


def test_rerun_resumes_instead_of_restarting(tmp_path):
    from open_clip_cxr_train.text_stage import train
    recipe = tiny_recipe(tmp_path, **{"supcon.steps": 2, "eval.enabled": False})
    train(recipe)
    common.reset_accelerator_state()
    train(tiny_recipe(tmp_path, **{"supcon.steps": 4, "eval.enabled": False}))
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss_mean" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]     # MNTP reused from its adapter, supcon went on from step 4


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    """Stopped mid-way through the contrastive step (after its checkpoint), then rerun: the steps
    after the restart have the uninterrupted run's losses (data, optimiser, schedule and RNG restored)."""
    from open_clip_cxr_train.text_stage import train
    over = {"supcon.steps": 4, "supcon.cache": True, "supcon.lora.dropout": 0.1,   # dropout: the RNG must resume too
            "train.checkpoint_every": 100, "eval.enabled": False}
    for run in ("full", "cut"):
        (tmp_path / run).mkdir()
    train(tiny_recipe(tmp_path / "full", **over))
    common.reset_accelerator_state()
    assert train(tiny_recipe(tmp_path / "cut", **over, **{"train.stop_after": 4})) == {"stopped_at": 4}
    common.reset_accelerator_state()
    assert train(tiny_recipe(tmp_path / "cut", **over))["supcon_steps"] == 4

    def losses(run):
        rows = (tmp_path / run / "stage1" / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, rows) if "loss_mean" not in r}
    full, cut = losses("full"), losses("cut")
    assert sorted(cut) == sorted(full) == [1, 2, 3, 4, 5, 6]     # 2 MNTP + 4 contrastive steps
    for step in (5, 6):
        assert cut[step] == pytest.approx(full[step], abs=1e-6), (step, full[step], cut[step])


def test_reports_from_shards(tmp_path):
    from open_clip_cxr_train.text_stage import load_reports
    tar = tmp_path / "train-000000.tar"
    with tarfile.open(tar, "w") as t:
        for i, (f, im) in enumerate(REPORTS[:3]):
            for img in range(2):   # two images of one study: one report
                meta = {"study_id": f"s{i}", "split": "train", "sections": {"findings": f, "impression": im}}
                for ext, data in (("json", json.dumps(meta).encode()), ("txt", f"{f} {im}".encode())):
                    info = tarfile.TarInfo(f"s{i}_{img}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    got = load_reports({"shards": str(tar)}, "train")
    assert [(r.study_id, r.findings, r.impression) for r in got] == [(f"s{i}", f, im) for i, (f, im) in enumerate(REPORTS[:3])]


def test_cli_parses_recipe_and_overrides(tmp_path, monkeypatch):
    import open_clip_cxr_train.text_stage as ts
    from open_clip_cxr.cli import main
    seen = {}
    monkeypatch.setattr(ts, "train", lambda recipe: seen.update(recipe) or {"output_dir": recipe["output_dir"]})
    assert main(["train-text", "--out", str(tmp_path / "o"), "--set", "supcon.steps=7"]) == 0
    assert seen["output_dir"] == str(tmp_path / "o") and seen["supcon"]["steps"] == 7
    assert seen["model"] == "cxr-llm-small-l2"


def test_demo_schedules_are_recipes_of_the_same_model():
    from open_clip_cxr_train.demo import SCHEDULES
    full, short = (common.load_recipe(str(SCHEDULES[k])) for k in ("recipe", "short"))
    assert full["model"] == short["model"] == "cxr-llm-small-l2"
    assert short["supcon"]["steps"] < full["supcon"]["steps"]
    assert short["supcon"]["cache_reports"] and full["supcon"]["cache_reports"] is None


def test_step_lines_say_the_time_left_until_the_stage_ends(tmp_path, capsys):
    from open_clip_cxr_train.text_stage import train
    train(tiny_recipe(tmp_path, **{"supcon.steps": 3, "eval.enabled": False}))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iter ")]
    # mntp ends at step 2, supcon at 2 + 3: each stage's last line has nothing left to estimate
    assert [("eta" in ln) for ln in lines] == [True, False, True, True, False], lines


def test_demo_names_the_short_schedule_where_it_trains_in_fp32():
    from open_clip_cxr_train.demo import schedule_hint
    assert "--schedule short" in schedule_hint("fp32", "recipe")
    assert schedule_hint("bf16", "recipe") is None and schedule_hint("fp32", "short") is None


def test_rerun_with_another_recipe_is_refused(tmp_path):
    """The folder's checkpoints belong to its recipe: another model or loss must not resume them."""
    from open_clip_cxr_train.text_stage import train
    train(tiny_recipe(tmp_path, **{"supcon.steps": 2, "eval.enabled": False}))
    common.reset_accelerator_state()
    with pytest.raises(ValueError, match="another recipe.*supcon.temperature"):
        train(tiny_recipe(tmp_path, **{"supcon.steps": 2, "supcon.temperature": 0.1, "eval.enabled": False}))
    # speed and logging knobs may change
    assert common.recipe_differences({"train": {"num_threads": 1, "lr": 1}, "mntp": {"steps": 2}},
                                     {"train": {"num_threads": 2, "lr": 1}, "mntp": {"steps": 4}}) == []


def test_demo_moves_a_stage1_of_another_recipe_aside(tmp_path, monkeypatch):
    import torch
    import open_clip_cxr_train.text_stage as ts
    from open_clip_cxr_train import demo
    calls = []
    monkeypatch.setattr(ts, "train", lambda recipe: calls.append(recipe) or {"trained": True})
    stage1, clip = tmp_path / "stage1", tmp_path / "clip"
    stage1.mkdir()
    clip.mkdir()
    (stage1 / "open_clip_config.json").write_text("{}")
    current = common.load_recipe(str(demo.SCHEDULES["recipe"]), ["eval.enabled=false"])
    current.update(output_dir=str(stage1))
    current["train"]["num_threads"] = torch.get_num_threads()
    common.save_recipe({**current, "model": "cxr-llm-small"}, str(stage1 / "recipe.yaml"))   # an older demo's
    assert demo.stage1(tmp_path, "recipe") == {"trained": True} and len(calls) == 1
    assert (tmp_path / "stage1.previous-1" / "open_clip_config.json").exists()
    assert (tmp_path / "clip.previous-1").exists() and not clip.exists()
    # the same recipe (thread count aside) is reused, not retrained
    stage1.mkdir()
    (stage1 / "open_clip_config.json").write_text("{}")
    common.save_recipe({**current, "train": {**current["train"], "num_threads": 7}}, str(stage1 / "recipe.yaml"))
    demo.stage1(tmp_path, "recipe")
    assert len(calls) == 1


def test_text_arch_swaps_the_tower_for_an_ablation(tmp_path):
    """`text_arch` (e.g. fewer decoder layers) trains and exports that tower; local-dir rebuilds it."""
    import open_clip
    from open_clip_cxr_train.text_stage import train
    recipe = tiny_recipe(tmp_path, **{"mntp.steps": 1, "supcon.steps": 1, "eval.enabled": False})
    recipe["text_arch"] = 'cxr-text:cxr-llm-tiny{"llm": {"num_hidden_layers": 1}}'
    train(recipe)
    common.reset_accelerator_state()
    model = open_clip.create_model(f"local-dir:{recipe['output_dir']}")
    assert len(model.text.transformer.base_llm().layers) == 1
