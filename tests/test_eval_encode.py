"""Embedding shards with a stand-in model, clear errors, the HTML gallery, and the eval CLI."""
import argparse
import io
import json
import math
import re

import pytest
import torch
import webdataset as wds
from PIL import Image

from open_clip_cxr.eval import encode as E

STUDIES = {   # hand-written reports; study s2 has two images
    "s1": ("Normal heart. Clear lungs.", {"Cardiomegaly": 0, "Edema": 0}),
    "s2": ("Small left effusion & <b>mild</b> cardiomegaly.", {"Cardiomegaly": 1, "Pleural Effusion": 1}),
    "s3": ("Interstitial edema.", {"Edema": 1, "Cardiomegaly": -1}),
}


class TinyTokenizer:
    context_length = 12

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + sum(map(ord, w)) % 60 for w in re.findall(r"\w+", t.lower())][: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class TinyClip(torch.nn.Module):
    """Stand-in for an OpenCLIP model: encode_image / encode_text / logit_scale and text limits."""
    vocab_size, context_length = 64, 12

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(3 * 8 * 8, 16)
        self.tok = torch.nn.Embedding(self.vocab_size, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_image(self, x, normalize=False):
        f = self.img(x.flatten(1))
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        f = self.tok(tokens).mean(1)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f


def preprocess(img):
    import numpy as np
    arr = np.asarray(img.convert("RGB").resize((8, 8)), dtype="float32") / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _png(seed):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(16, 16, generator=g) * 255).byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, studies=STUDIES, split="test", with_study_id=True, images_per=None):
    images_per = images_per or {"s2": 2}
    with wds.TarWriter(str(path)) as w:
        n = 0
        for sid, (text, labels) in studies.items():
            for j in range(images_per.get(sid, 1)):
                meta = {"image_id": f"{sid}i{j}", "split": split, "labels": labels,
                        "sections": {"findings": text, "impression": ""}}
                if with_study_id:
                    meta["study_id"] = sid
                w.write({"__key__": f"{split}_{sid}_{j}", "png": _png(n), "txt": text, "json": json.dumps(meta)})
                n += 1
    return str(path)


@pytest.fixture
def shard(tmp_path):
    return write_shard(tmp_path / "test-000000.tar")


def test_embed_shards_groups_images_by_study(shard):
    emb = E.embed_shards(TinyClip(), preprocess, TinyTokenizer(), shard, batch_size=3, progress=False)
    assert emb.image_emb.shape == (4, 16) and emb.text_emb.shape == (3, 16)
    assert emb.image_study_ids == ["s1", "s2", "s2", "s3"] and emb.text_study_ids == ["s1", "s2", "s3"]
    assert emb.texts[1] == STUDIES["s2"][0] and emb.meta["s3"]["labels"]["Edema"] == 1
    assert torch.allclose(emb.image_emb.norm(dim=1), torch.ones(4))
    none = E.embed_shards(TinyClip(), preprocess, None, shard, progress=False, limit=2)
    assert none.text_emb is None and len(none.image_keys) == 2


def test_clear_errors(shard, tmp_path):
    model = TinyClip()
    with pytest.raises(ValueError, match="no study_id"):
        E.embed_shards(model, preprocess, TinyTokenizer(), write_shard(tmp_path / "x.tar", with_study_id=False),
                       progress=False)
    no_images = tmp_path / "noimg.tar"
    with wds.TarWriter(str(no_images)) as w:
        w.write({"__key__": "a", "txt": "Clear.", "json": json.dumps({"study_id": "s"})})
    with pytest.raises(ValueError, match=r"no samples were read.*1 skipped .*lacking an image/txt"):
        E.embed_shards(model, preprocess, TinyTokenizer(), str(no_images), progress=False)
    with pytest.raises(ValueError, match="none of the samples read had split"):
        E.embed_shards(model, preprocess, TinyTokenizer(), shard, splits=["train"], progress=False)
    with pytest.raises(ValueError, match="report bank is empty"):
        E.encode_texts(model, TinyTokenizer(), [])
    big = TinyTokenizer()
    big.context_length = 40
    with pytest.raises(ValueError, match="context length 40 exceeds the model's 12"):
        E.encode_texts(model, big, ["a b"])
    wide = TinyClip()
    wide.vocab_size = 10
    with pytest.raises(ValueError, match="outside the model's vocabulary of 10"):
        E.encode_texts(wide, TinyTokenizer(), ["effusion cardiomegaly edema"])
    with pytest.raises(ValueError, match=r"\(key, study_id, image, text, meta\)"):
        E.encode_images(model, [("k", torch.zeros(3, 8, 8))])


def test_text_limits_of_an_openclip_style_text_tower():
    class Text(torch.nn.Module):
        context_length = 77

        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(500, 4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = Text()

    assert E.text_limits(Model()) == (500, 77)


def test_gallery_escapes_and_copies_thumbnails(tmp_path):
    from open_clip_cxr.eval.gallery import plan_gallery, write_gallery
    from open_clip_cxr.eval.retrieval import recall_at_k
    emb = E.ShardEmbeddings(torch.nn.functional.normalize(torch.randn(4, 5), dim=-1), ["k<1>", "k2", "k3", "k4"],
                            ["s1", "s2", "s2", "s3"], torch.nn.functional.normalize(torch.randn(3, 5), dim=-1),
                            ["s1", "s2", "s3"], [STUDIES[s][0] for s in ("s1", "s2", "s3")])
    _, det = recall_at_k(emb.image_emb, emb.image_study_ids, emb.text_emb, emb.text_study_ids, ks=(1, 3),
                         return_details=True)
    t2i, i2t = det["text_to_image"].indices, det["image_to_text"].indices
    iq, tq, keys = plan_gallery(4, 3, emb.image_keys, t2i, n_image_queries=2, n_text_queries=2)
    images = {k: torch.rand(3, 8, 8) for k in keys}
    page = write_gallery(str(tmp_path / "g"), image_keys=emb.image_keys, image_study_ids=emb.image_study_ids,
                         text_study_ids=emb.text_study_ids, texts=emb.texts, i2t_indices=i2t, t2i_indices=t2i,
                         images=images, image_queries=iq, text_queries=tq)
    html = open(page).read()
    assert "<b>mild</b>" not in html and "&lt;b&gt;mild&lt;/b&gt;" in html   # report text is escaped
    assert "k<1>" not in html
    pngs = list((tmp_path / "g" / "img").glob("*.png"))
    assert len(pngs) == len(keys) and html.count("<img ") >= 2


def _cli_args(tmp_path, shard, **kw):
    from open_clip_cxr.eval import cli
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    argv = ["--model", "tiny", "--shards", shard, "--out", str(tmp_path / "out"), "--batch-size", "2"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return p.parse_args(argv)


@pytest.fixture
def cli(monkeypatch):
    from open_clip_cxr.eval import cli as C
    monkeypatch.setattr(C, "load_model", lambda args: (TinyClip(), preprocess, TinyTokenizer()))
    return C


def test_cli_retrieval_writes_results_csv_and_gallery(cli, shard, tmp_path):
    args = _cli_args(tmp_path, shard, gallery=tmp_path / "gal", ks="1")
    assert cli.run(args) == 0
    res = json.load(open(tmp_path / "out" / "results.json"))
    assert res["task"] == "retrieval" and set(res["results"]["image_to_text"]) == {"R@1"}
    assert (tmp_path / "out" / "image_to_text_topk.csv").exists()
    assert (tmp_path / "out" / "text_to_image_topk.csv").exists()
    assert (tmp_path / "gal" / "index.html").exists() and list((tmp_path / "gal" / "img").glob("*.png"))


def test_cli_zeroshot_and_report_gen(cli, shard, tmp_path):
    assert cli.run(_cli_args(tmp_path, shard, task="zeroshot")) == 0
    zs = json.load(open(tmp_path / "out" / "results.json"))["results"]
    assert zs["per_finding"]["Cardiomegaly"]["n_pos"] == 2 and zs["per_finding"]["Cardiomegaly"]["n_neg"] == 1
    bank = write_shard(tmp_path / "train-000000.tar", split="train",
                       studies={"b1": ("Clear lungs.", {}), "b2": ("Left effusion.", {})})
    args = _cli_args(tmp_path, shard, task="report-gen", bank_shards=bank, bertscore_model="none", no_meteor=True)
    assert cli.run(args) == 0
    rg = json.load(open(tmp_path / "out" / "results.json"))["results"]
    assert rg["n_reports"] == 4 and "BLEU-4" in rg["metrics"] and rg["bank_reports"] == 2
    lines = [json.loads(l) for l in open(tmp_path / "out" / "generated.jsonl")]
    assert len(lines) == 4 and all(l["generated"] in ("Clear lungs.", "Left effusion.") for l in lines)


def test_cli_report_gen_refuses_a_judge_that_is_not_here_before_any_embedding(cli, shard, tmp_path, capsys, monkeypatch):
    from open_clip_cxr.cli import main
    monkeypatch.setattr(E, "embed_shards", lambda *a, **k: pytest.fail("embedded before the judge was found"))
    for judge, says in ((str(tmp_path / "no-judge"), "no model folder"), ("someorg/not-cached", "huggingface-cli download")):
        rc = main(["eval", "--task", "report-gen", "--model", "tiny", "--shards", shard, "--bank-shards", shard,
                   "--bertscore-model", "none", "--judge", judge, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"--judge {judge}" in err[0] and says in err[0], err
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_needs_shards(cli, tmp_path):
    from open_clip_cxr.eval import cli as C
    p = argparse.ArgumentParser()
    C.add_arguments(p)
    with pytest.raises(SystemExit, match="--shards"):
        C.run(p.parse_args(["--model", "x", "--out", str(tmp_path)]))


def test_real_tiny_openclip_model_end_to_end(tiny, shard):
    """The plugin's random `cxr-llm-tiny` through embed_shards and recall_at_k (its scores mean nothing)."""
    from open_clip_cxr.eval.retrieval import recall_at_k
    model, preprocess_, tokenizer = tiny
    emb = E.embed_shards(model, preprocess_, tokenizer, shard, batch_size=2, progress=False)
    assert emb.image_emb.shape[0] == 4 and emb.text_emb.shape[0] == 3
    assert emb.image_emb.shape[1] == emb.text_emb.shape[1]
    out = recall_at_k(emb.image_emb, emb.image_study_ids, emb.text_emb, emb.text_study_ids, ks=(1, 4))
    assert out["image_to_text"]["R@4"] == 1.0 and out["text_to_image"]["R@4"] == 1.0   # 3 reports, 4 images
