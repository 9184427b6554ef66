"""The GPU stage-1 sweep's pieces that run anywhere: the GGUF slice, the summary, the bench's --device check."""
import importlib.util as iu
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")


def _load(name):
    spec = iu.spec_from_file_location(name, f"bench/{name}.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_gguf(path, blocks=3):
    """A llama-layout GGUF: a quantised embedding, a norm, `blocks` blocks, a string array field."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(blocks)
    w.add_context_length(64)
    w.add_token_list(["<a>", "b", "c"])
    rng = np.random.default_rng(0)
    embd = rng.standard_normal((8, 64)).astype(np.float32)
    q = gguf.quants.quantize(embd, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    for b in range(blocks):
        w.add_tensor(f"blk.{b}.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_slice_keeps_the_lowest_blocks_byte_for_byte(tmp_path):
    assets = _load("gpu_stage1_assets")
    _tiny_gguf(tmp_path / "full.gguf", blocks=3)
    assets.slice_gguf(tmp_path / "full.gguf", tmp_path / "cut.gguf", blocks=1)
    full, cut = gguf.GGUFReader(str(tmp_path / "full.gguf")), gguf.GGUFReader(str(tmp_path / "cut.gguf"))
    assert cut.fields["llama.block_count"].contents() == 1
    assert cut.fields["tokenizer.ggml.tokens"].contents() == ["<a>", "b", "c"]
    assert cut.fields["llama.context_length"].contents() == 64
    names = {t.name: t for t in full.tensors}
    assert [t.name for t in cut.tensors] == ["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"]
    for t in cut.tensors:
        assert t.tensor_type == names[t.name].tensor_type
        assert bytes(t.data) == bytes(names[t.name].data)


def _bench_json(path, mean, hosp, discr):
    err = {"accuracy": discr, "per_error_type": {k: {"accuracy": discr, "n": 10}
                                                  for k in ("negation", "laterality", "insertion")}}
    styles = {s: {"R@1": hosp} for s in ("hospital_mix", "caps_headers", "numbered_list", "telegraphic_impression")}
    res = {"variant_to_original_mean_R@1": mean, "variant_to_original": styles, "error_discrimination": err}
    path.write_text(json.dumps({"validate:None:0:heldout:0123456789ab": {"runs/x": res},
                                "validate:None:0:train:ba9876543210": {"runs/x": res}}))


def test_summary_has_one_row_per_run(tmp_path, capsys, monkeypatch):
    summary = _load("gpu_stage1_summary")
    _bench_json(tmp_path / "A.bench.json", 0.9, 0.8, 0.7)
    (tmp_path / "A.wall").write_text("145\n")
    _bench_json(tmp_path / "B.bench.json", 0.5, 0.4, 0.3)
    (tmp_path / "C.bench.json").write_text("{}")          # a run whose bench never finished
    monkeypatch.setattr(sys, "argv", ["summary", str(tmp_path)])
    summary.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == list(summary.COLUMNS)
    assert lines[1].split("\t") == ["A", "0.900", "0.800", "0.800", "0.800", "0.800", "0.700", "0.700", "0.700",
                                    "0.700", "0.900", "0.700", "145"]
    assert lines[2].startswith("B\t0.500") and lines[2].endswith("\t-")
    assert lines[3].startswith("C.bench.json: unreadable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_bench_device_without_gpu_is_one_line():
    r = subprocess.run([sys.executable, "bench/bench_text_stage.py", "--device", "cuda", "--columns", "bow"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --device cuda: this machine has no GPU")


def test_assets_never_replace_a_folder_without_overwrite(tmp_path):
    out = tmp_path / "gpu"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, "bench/gpu_stage1_assets.py", "--out", str(out),
                        "--llm-variants", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {out} exists: pass --overwrite to rebuild it"
    assert (out / "keep.txt").read_text() == "mine"
