"""The bidirectional text tower: attention, padding, pooling, instructions, LoRA."""
import pytest
import torch
from transformers import AutoModel

from open_clip_cxr.text import CXRTextModel, config_from_spec, count_parameters, spec_for
from open_clip_cxr.text.lora import adapter_state_dict, load_adapter_state_dict

PAD = 0


def tower(**overrides):
    torch.manual_seed(0)
    spec = "cxr-text:cxr-llm-tiny"
    config = config_from_spec(spec)
    for k, v in overrides.items():
        setattr(config, k, v)
    return CXRTextModel(config).eval()


def ids(rows, length=12, left=False):
    out = torch.full((len(rows), length), PAD)
    for i, r in enumerate(rows):
        if left:
            out[i, length - len(r):] = torch.tensor(r)
        else:
            out[i, :len(r)] = torch.tensor(r)
    return out


@torch.no_grad()
def test_attention_is_bidirectional():
    model = tower(lora=None)
    a, b = ids([[10, 11, 12, 13, 14]]), ids([[10, 11, 12, 13, 99]])
    h_a = model(input_ids=a).last_hidden_state[0, 0]
    h_b = model(input_ids=b).last_hidden_state[0, 0]
    assert not torch.allclose(h_a, h_b, atol=1e-6)  # the first position saw the last token
    # The same decoder read causally cannot see it.
    causal = AutoModel.from_config(model.config.llm_config())
    causal.load_state_dict(model.base_llm().state_dict())
    c_a = causal(input_ids=a).last_hidden_state[0, 0]
    c_b = causal(input_ids=b).last_hidden_state[0, 0]
    assert torch.allclose(c_a, c_b, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("pooling", ["mean", "last_token", "latent_attention"])
def test_left_and_right_padding_agree(pooling):
    model = tower(pooling=pooling) if pooling != "latent_attention" else tower()
    if pooling != "latent_attention":
        from open_clip_cxr.text.pooling import build_pooler
        model.pooler = build_pooler(model.config)
    rows = [[5, 6, 7, 8, 9, 10], [20, 21], [30, 31, 32]]
    right = model(input_ids=ids(rows)).pooler_output
    left = model(input_ids=ids(rows, left=True)).pooler_output
    longer = model(input_ids=ids(rows, length=40)).pooler_output
    assert torch.allclose(right, left, atol=1e-5)
    assert torch.allclose(right, longer, atol=1e-5)
    # and a batch of one gives the same as inside a batch
    alone = model(input_ids=ids(rows[1:2])).pooler_output
    assert torch.allclose(alone[0], right[1], atol=1e-5)


@torch.no_grad()
def test_pooling_modes_match_their_definitions():
    from open_clip_cxr.text.pooling import LastTokenPooling, LatentAttentionPooling, MeanPooling
    torch.manual_seed(1)
    h = torch.randn(3, 7, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).bool()
    mean = MeanPooling()(h, mask)
    last = LastTokenPooling()(h, mask)
    latent = LatentAttentionPooling(64, num_latents=8, heads=4)
    batched = latent(h, mask)
    for i in range(3):
        valid = h[i][mask[i]]
        assert torch.allclose(mean[i], valid.mean(0), atol=1e-6)
        assert torch.allclose(last[i], valid[-1], atol=1e-6)
        assert torch.allclose(batched[i], latent.attend(valid).mean(0), atol=1e-5)


@torch.no_grad()
def test_instruction_is_read_but_not_pooled():
    from open_clip_cxr.text.pooling import MeanPooling
    model = tower()
    model.pooler = MeanPooling()
    sep = model.config.instruction_separator_id
    text = [40, 41, 42]
    plain = ids([text])
    instructed = ids([[70, 71, 72, sep] + text])
    out = model(input_ids=instructed)
    pooled_by_hand = model.norm(out.last_hidden_state[0, 4:7].mean(0))
    assert torch.allclose(out.pooler_output[0], pooled_by_hand, atol=1e-5)
    # the instruction is read: the text's token states (and so the embedding) change with it
    assert not torch.allclose(out.pooler_output, model(input_ids=plain).pooler_output, atol=1e-4)
    # an instruction with nothing after it still embeds
    assert torch.isfinite(model(input_ids=ids([[70, sep]])).pooler_output).all()


@torch.no_grad()
def test_empty_and_overlong_texts(tiny):
    model, _, tokenizer = tiny
    long_text = "Moderate right pleural effusion. " * 200
    tokens = tokenizer(["", long_text])
    assert tokens.shape == (2, 128)  # truncated to the context, not rejected
    emb = model.encode_text(tokens, normalize=True)
    assert torch.isfinite(emb).all() and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_lora_counts_and_frozen_base():
    model = tower()
    counts = count_parameters(model)
    cfg = model.config
    r, h = cfg.lora["r"], cfg.hidden_size
    kv = cfg.llm["num_key_value_heads"] * (h // cfg.llm["num_attention_heads"])
    per_layer = r * ((h + h) * 2 + (h + kv) * 2)  # q,o: h->h ; k,v: h->kv
    assert counts["trainable"] == cfg.llm["num_hidden_layers"] * per_layer + 2 * h  # + LayerNorm
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "norm." not in n[:5])
    off = tower(lora=None)
    assert not off.has_lora and count_parameters(off)["trainable"] == count_parameters(off)["total"]


@torch.no_grad()
def test_lora_merge_equals_unmerged_and_adapter_round_trip():
    model = tower()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(std=0.5)  # B starts at zero; make the adapter matter
    x = ids([[5, 6, 7, 8], [9, 10]])
    with_adapter = model(input_ids=x).pooler_output
    adapter = adapter_state_dict(model.llm)
    assert adapter and all("lora_" in k for k in adapter)

    fresh = tower()
    assert not torch.allclose(fresh(input_ids=x).pooler_output, with_adapter, atol=1e-4)
    load_adapter_state_dict(fresh.llm, adapter)
    assert torch.allclose(fresh(input_ids=x).pooler_output, with_adapter, atol=1e-5)

    model.merge_lora()
    assert not model.has_lora and model.config.lora is None
    assert torch.allclose(model(input_ids=x).pooler_output, with_adapter, atol=1e-5)
    # a merged tower's spec rebuilds a LoRA-free architecture with the same keys
    rebuilt = CXRTextModel(config_from_spec(spec_for(model.config)))
    assert set(rebuilt.state_dict()) == set(model.state_dict())


def test_base_weights_from_a_saved_tower_keep_both_norms(tmp_path):
    """A folder saved from our tower has `llm.norm.*` (decoder) and `norm.*` (output LayerNorm)."""
    from safetensors.torch import save_file
    src = tower(lora=None)
    with torch.no_grad():
        src.norm.weight.normal_()
        src.base_llm().norm.weight.normal_()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    config = config_from_spec("cxr-text:cxr-llm-tiny")
    config.base_weights = str(tmp_path)
    loaded = CXRTextModel.from_base(config).eval()
    assert torch.equal(loaded.norm.weight, src.norm.weight)
    assert torch.equal(loaded.base_llm().norm.weight, src.base_llm().norm.weight)
    assert loaded.load_report["pooler_loaded"] and loaded.has_lora
    x = ids([[5, 6, 7], [8, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).pooler_output, src(input_ids=x).pooler_output, atol=1e-5)


def test_base_weights_into_a_shallower_tower_keep_the_lowest_layers(tmp_path):
    """A config with fewer decoder layers than its weights (`cxr-llm-small-l4`) takes the lowest
    ones, says which it skipped, and computes exactly the deep model's lower layers."""
    import json
    from safetensors.torch import save_file
    deep_cfg = config_from_spec('cxr-text:cxr-llm-tiny{"lora": null, "llm": %s}' % json.dumps(
        {**config_from_spec("cxr-text:cxr-llm-tiny").llm, "num_hidden_layers": 3}))
    deep = CXRTextModel(deep_cfg).eval()
    save_file({k: v.contiguous() for k, v in deep.state_dict().items()}, str(tmp_path / "model.safetensors"))
    shallow_cfg = config_from_spec('cxr-text:cxr-llm-tiny{"lora": null, "llm": %s}' % json.dumps(
        {**deep_cfg.llm, "num_hidden_layers": 1}))
    shallow_cfg.base_weights = str(tmp_path)
    shallow = CXRTextModel.from_base(shallow_cfg).eval()
    assert shallow.load_report["skipped_layers"] == [1, 2] and shallow.load_report["unexpected"] == []
    assert torch.equal(shallow.base_llm().layers[0].self_attn.q_proj.weight, deep.base_llm().layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        deep.base_llm().layers = deep.base_llm().layers[:1]   # the deep model cut by hand
        deep.base_llm().config.num_hidden_layers = 1
        x = ids([[5, 6, 7], [8, 9]])
        assert torch.allclose(shallow(input_ids=x).pooler_output, deep(input_ids=x).pooler_output, atol=1e-5)


def test_cxr_llm_small_l4_is_the_lowest_four_layers_of_cxr_llm_small():
    small, l4 = config_from_spec("cxr-text:cxr-llm-small"), config_from_spec("cxr-text:cxr-llm-small-l4")
    assert l4.llm["num_hidden_layers"] == 4 and small.llm["num_hidden_layers"] == 30
    assert {**l4.llm, "num_hidden_layers": 30} == small.llm and l4.base_weights == small.base_weights


def test_spec_overrides_merge_into_the_llm_dict():
    cfg = config_from_spec('cxr-text:cxr-llm-small{"llm": {"num_hidden_layers": 3}, "num_latents": 8}')
    small = config_from_spec("cxr-text:cxr-llm-small")
    assert cfg.llm == {**small.llm, "num_hidden_layers": 3} and cfg.num_latents == 8


# ---------------------------------------------------------------- case folding in the tokenizer

SHOUTED = "FINDINGS: NO PNEUMOTHORAX. SMALL RIGHT PLEURAL EFFUSION, CHF. IMPRESSION: NO ACUTE DISEASE."


def test_fold_capitals_folds_shouted_text_and_leaves_mixed_case():
    from open_clip_cxr.text.case import fold_capitals
    assert fold_capitals(SHOUTED) == SHOUTED.lower()
    assert fold_capitals(SHOUTED, style="sentence") == ("Findings: No pneumothorax. Small right pleural effusion, "
                                                        "chf. Impression: No acute disease.")
    mixed = "FINDINGS: No PTX in the RLL. Mild cardiomegaly, CHF. IMPRESSION: Stable since the prior study."
    assert fold_capitals(mixed) == mixed
    assert fold_capitals("") == "" and fold_capitals("1. 2.") == "1. 2."
    # an instruction is judged apart from the text it introduces; the separator is kept
    assert fold_capitals("Retrieve the report <file_sep>" + SHOUTED) == "Retrieve the report <file_sep>" + SHOUTED.lower()
    assert fold_capitals("Retrieve it !@#$%^&*()NO PTX") == "Retrieve it !@#$%^&*()no ptx"
    assert fold_capitals("Retrieve it <file_sep>NO PTX", style="sentence") == "Retrieve it <file_sep>No ptx"


def test_sentence_case_capitalises_sentence_line_and_header_starts_only():
    from open_clip_cxr.text.case import sentence_case
    assert sentence_case("EXAM: CHEST 2 VIEWS\n  FINDINGS: NODULE 3.5 MM. NO PTX! R.L.L. CLEAR? YES") == \
        "Exam: Chest 2 views\n  Findings: Nodule 3.5 mm. No ptx! R.l.l. Clear? Yes"
    assert sentence_case("") == "" and sentence_case("1. 2.") == "1. 2."


def test_fold_capitals_setting_is_checked():
    import open_clip
    from open_clip_cxr.text.case import fold_style
    assert [fold_style(v) for v in (None, False, True, "lower", "sentence")] == [None, None, "lower", "lower", "sentence"]
    with pytest.raises(ValueError, match="fold_capitals must be true, false or one of 'lower', 'sentence'; got 'Sentence'"):
        open_clip.get_tokenizer("cxr-llm-tiny", fold_capitals="Sentence")


def test_tokenizer_folds_capitals_per_model_config(tiny, tmp_path):
    import json
    import open_clip
    from open_clip_cxr.text.case import sentence_case
    from open_clip_cxr_convert.export import export_folder
    model, _, tok = tiny
    assert tok.fold_capitals == "sentence"   # our configs' fold (text_cfg.tokenizer_kwargs)
    assert torch.equal(tok([SHOUTED]), tok([sentence_case(SHOUTED)]))
    assert not torch.equal(tok([SHOUTED]), tok([SHOUTED.lower()]))
    # `fold_capitals: true`, as exports made before the sentence fold record it, still lower-cases
    old = open_clip.get_tokenizer("cxr-llm-tiny", fold_capitals=True)
    assert old.fold_capitals == "lower" and torch.equal(old([SHOUTED]), old([SHOUTED.lower()]))
    mixed = "FINDINGS: No PTX in the RLL. Mild cardiomegaly, CHF. IMPRESSION: Stable."
    raw = open_clip.get_tokenizer("cxr-llm-tiny", fold_capitals=False)
    assert not raw.fold_capitals
    assert torch.equal(tok([mixed]), raw([mixed]))                   # normal mixed case untouched
    assert not torch.equal(raw([SHOUTED]), raw([SHOUTED.lower()]))   # the byte tokenizer reads case
    # the option travels with an exported folder, and `local-dir:` reads it back
    out = export_folder(model, open_clip.get_model_config("cxr-llm-tiny"), tok, tmp_path / "out", merge_lora=False)
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["tokenizer_kwargs"]["fold_capitals"] == "sentence"
    again = open_clip.get_tokenizer(f"local-dir:{out}")
    assert again.fold_capitals == "sentence" and torch.equal(again([SHOUTED]), tok([SHOUTED]))


def test_lower_case_keeps_instruction_separators():
    from open_clip_cxr.text.case import lower_case
    assert lower_case("No PTX in the RLL.") == "no ptx in the rll."
    assert lower_case("Retrieve The Report <file_sep>No PTX") == "retrieve the report <file_sep>no ptx"
    assert lower_case("Retrieve it !@#$%^&*()RLL") == "retrieve it !@#$%^&*()rll"


def test_stage1_lowercase_recipe_key_reaches_the_exported_tokenizer(tmp_path):
    """`lowercase: true` makes an uncased tower: the tokenizer trained with lower-cases every
    text, and the exported folder's config rebuilds that tokenizer."""
    import json
    import open_clip
    from open_clip_cxr_convert.export import export_folder
    from open_clip_cxr_train.stage1_model import build_model
    mixed = "FINDINGS: No PTX in the RLL. Mild cardiomegaly."
    model, tok, model_cfg, _ = build_model("cxr-llm-tiny", lowercase=True)
    assert tok.lowercase and torch.equal(tok([mixed]), tok([mixed.lower()]))
    assert model_cfg["text_cfg"]["tokenizer_kwargs"] == {"fold_capitals": "sentence", "drop_admin_lines": True,
                                                         "lowercase": True}
    assert "lowercase" not in open_clip.get_model_config("cxr-llm-tiny")["text_cfg"]["tokenizer_kwargs"]
    out = export_folder(model, model_cfg, tok, tmp_path / "out", merge_lora=False)
    again = open_clip.get_tokenizer(f"local-dir:{out}")
    assert again.lowercase and torch.equal(again([mixed]), tok([mixed]))
    _, cased, cased_cfg, _ = build_model("cxr-llm-tiny")   # null: as the config says (cased)
    assert not cased.lowercase and not torch.equal(cased([mixed]), cased([mixed.lower()]))
    assert json.dumps(cased_cfg).count("lowercase") == 0
