"""`auto` precision and threads (open_clip_cxr/precision.py), and the MFU peak that follows them."""
import json
from pathlib import Path

import pytest
import torch

from open_clip_cxr import precision
from open_clip_cxr_train import common

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fake_rates(monkeypatch, rates):
    """linear_rate -> rates[(mode, threads)] (GFLOP/s); records every call."""
    calls = []

    def fake(modes, shape=precision.MODEL_SHAPE, device="cpu", threads=None, **kw):
        threads = int(threads or torch.get_num_threads())
        calls.extend((m, threads) for m in modes)
        return {m: rates.get((m, threads), rates.get(m, 1.0)) * 1e9 for m in modes}
    monkeypatch.setattr(precision, "linear_rates", fake)
    return calls


def test_normalize_accepts_recipe_spellings_and_refuses_typos():
    assert [precision.normalize(v) for v in (None, False, "no", "FP32", "bfloat16", "bf16", "auto")] == \
        ["auto", "fp32", "fp32", "fp32", "bf16", "bf16", "auto"]
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        precision.normalize("bf61")


@pytest.mark.parametrize("fp32,bf16,expect", [(60, 170, "bf16"), (60, 6, "fp32"), (60, 62, "fp32")])
def test_auto_takes_bf16_only_when_measured_faster(monkeypatch, fp32, bf16, expect):
    fake_rates(monkeypatch, {"fp32": fp32, "bf16": bf16})
    c = precision.choose("auto", "cpu", threads=1)
    assert c.precision == expect and c.ratio == pytest.approx(bf16 / fp32)
    assert c.mixed_precision == ("no" if expect == "fp32" else "bf16")
    assert c.dtype == (None if expect == "fp32" else torch.bfloat16)
    assert f"{c.ratio:.2f}x" in c.line() and c.record()["bf16_over_fp32"] == pytest.approx(bf16 / fp32, abs=1e-3)


def test_explicit_values_force_and_the_environment_overrides(monkeypatch):
    calls = fake_rates(monkeypatch, {"fp32": 60, "bf16": 6})
    assert precision.choose("bf16").precision == "bf16" and not calls   # forced: no probe
    monkeypatch.setenv(precision.ENV, "bf16")
    assert precision.choose("fp32").precision == "bf16"
    monkeypatch.setenv(precision.ENV, "auto")
    c = precision.choose("bf16", "cpu")
    assert c.precision == "fp32" and c.source == f"env {precision.ENV}" and calls
    monkeypatch.setenv(precision.ENV, "fast")
    with pytest.raises(ValueError, match=precision.ENV):
        precision.choose("auto")


def test_auto_threads_take_every_core_only_when_faster(monkeypatch):
    monkeypatch.setattr(precision, "usable_cores", lambda: 4)
    fake_rates(monkeypatch, {("fp32", 1): 60, ("fp32", 4): 200})
    assert precision.choose_threads("auto", "fp32")[0] == 4
    fake_rates(monkeypatch, {("fp32", 1): 60, ("fp32", 4): 61})
    assert precision.choose_threads("auto", "fp32")[0] == 1
    assert precision.choose_threads(3)[0] == 3 and precision.choose_threads(None)[0] == torch.get_num_threads()
    with pytest.raises(ValueError, match="positive integer or auto"):
        precision.choose_threads("many")


def test_probe_measures_something_and_is_cached():
    shape = (16, 32, 48)
    torch.set_num_threads(1)
    r = precision.linear_rate("fp32", shape, threads=2, seconds=0.01, repeats=1)
    assert r > 0 and precision.linear_rate("fp32", shape, threads=2) == r
    assert torch.get_num_threads() == 1     # the probe's thread count is its own


def test_peak_dtype_follows_the_precision(monkeypatch):
    calls = fake_rates(monkeypatch, {"fp32": 50, "bf16_pure": 150})
    assert precision.peak_flops("cpu", torch.float32) == 50e9 and {m for m, _ in calls} == {"fp32"}
    calls.clear()
    assert common.peak_flops("cpu", "bf16") == 150e9 and {m for m, _ in calls} == {"bf16_pure"}


def test_resume_of_a_run_saved_with_an_explicit_precision(tmp_path):
    """A run saved before `auto` existed (mixed_precision: bf16, num_threads: 1) resumes under auto."""
    old = {"model": "m", "train": {"mixed_precision": "bf16", "num_threads": 1, "frozen_low_precision": True}}
    common.save_recipe(old, str(tmp_path / "recipe.yaml"))
    new = {"model": "m", "train": {"mixed_precision": "auto", "num_threads": "auto", "frozen_low_precision": True},
           "resolved": {"precision": "fp32", "bf16_over_fp32": 0.1}}
    common.save_recipe(new, str(tmp_path / "recipe.yaml"))      # no "another recipe" error
    with pytest.raises(ValueError, match="model"):
        common.save_recipe({**new, "model": "other"}, str(tmp_path / "recipe.yaml"))


@pytest.mark.parametrize("forced", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_tiny_run_logs_its_precision_and_mfu_below_100(tmp_path, monkeypatch, forced):
    """The MFU peak is measured in the dtype the run computes in, and never exceeded."""
    from open_clip_cxr_train.text_stage import train
    monkeypatch.setenv(precision.ENV, forced)
    modes = []
    real = precision.linear_rates
    monkeypatch.setattr(precision, "linear_rates", lambda ms, *a, **k: modes.extend(ms) or real(ms, *a, **k))
    common.reset_accelerator_state()
    torch.set_num_threads(1)
    rows = [{"study": f"s{i}", "findings": f"the heart is normal in size {i}. lungs are clear.",
             "impression": f"no acute disease {i}.", "split": "train"} for i in range(6)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = common.load_recipe(str(ROOT / "training/recipes/text-cxr-llm-small-cpu.yaml"), [
        "model=cxr-llm-tiny", "max_length=64", "train.log_with=none", "train.log_every=1", "train.checkpoint_every=0",
        "train.num_threads=1", "mntp.steps=2", "mntp.batch_size=4", "supcon.steps=2", "supcon.batch_size=4",
        "supcon.warmup_steps=1", "supcon.cache_reports=4", "eval.enabled=false"])
    recipe["data"] = {"source": "table", "path": str(tmp_path / "r.jsonl"), "findings_col": "findings",
                      "impression_col": "impression", "study_col": "study", "split_col": "split"}
    recipe["output_dir"] = str(tmp_path / "run")
    try:
        summary = train(recipe)
    finally:
        common.reset_accelerator_state()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in logged if "mfu" in r]
    assert stats and all(r["precision"] == forced for r in stats)
    assert all(0 < r["mfu"] <= 100 for r in stats)
    peak_mode = "fp32" if forced == "fp32" else "bf16_pure"
    assert peak_mode in modes and not ({"fp32", "bf16_pure"} - {peak_mode}) & set(modes)
    saved = common.load_recipe(str(tmp_path / "run" / "recipe.yaml"))
    assert saved["resolved"]["precision"] == forced and saved["resolved"]["source"] == f"env {precision.ENV}"
    assert summary["cache"]["precision"] == forced and summary["cache"]["texts_per_s"] > 0


def test_refresh_measures_again_and_keeps_the_higher_peak():
    shape, keys = (8, 16, 32), [("cpu", "fp32", (t, 16, 32), 1) for t in (8, 32)]
    for k in keys:
        precision._RATES[k] = 1.0              # a probe taken on a very busy machine
    assert precision.peak_flops("cpu", torch.float32, shape, threads=1) == 1.0   # cached
    fresh = precision.peak_flops("cpu", torch.float32, shape, threads=1, refresh=True)
    assert fresh > 1.0
    for k in keys:
        precision._RATES[k] = 1e18
    assert precision.peak_flops("cpu", torch.float32, shape, threads=1, refresh=True) == 1e18
    for k in keys:
        precision._RATES.pop(k)


def test_eval_precision_flag(monkeypatch):
    from open_clip_cxr.eval.encode import model_precision
    fake_rates(monkeypatch, {"fp32": 60, "bf16": 6})
    assert model_precision("auto") == "fp32" and model_precision("pure_bf16") == "pure_bf16"
    monkeypatch.setenv(precision.ENV, "bf16")
    assert model_precision("auto") == "bf16" and model_precision("pure_bf16") == "bf16"


def test_length_sorted_text_batches_keep_the_input_order():
    import open_clip
    import open_clip_cxr  # noqa: F401
    from open_clip_cxr.eval.encode import encode_texts
    torch.manual_seed(0)
    model = open_clip.create_model("cxr-llm-tiny", pretrained_image=False).eval()
    tok = open_clip.get_tokenizer("cxr-llm-tiny")
    texts = ["a much longer report about the heart and the lungs, both normal", "short",
             "medium length text here", "x", "another fairly long report: no effusion, no pneumothorax"]
    batched = encode_texts(model, tok, texts, batch_size=2)
    alone = torch.cat([encode_texts(model, tok, [t], batch_size=1) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or __import__("platform").machine() != "x86_64",
                    reason="oneDNN on x86 only")
def test_auto_picks_fp32_where_bf16_is_emulated():
    """oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) runs bf16 like an AVX2-only CPU: ~4x slower
    than fp32 on this machine (measured), so auto must pick fp32 there."""
    import os
    import subprocess
    import sys
    code = ("from open_clip_cxr import precision; c = precision.choose('auto', threads=1); "
            "print(c.precision, round(c.ratio, 3))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}
    env.pop(precision.ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    pick, ratio = out.stdout.split()
    assert pick == "fp32" and float(ratio) < 1.0


def _agree_rank(rank, world, port, out):
    import os
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    # rank 1 measures bf16 slower (a busier or an AVX2-only machine); rank 0 faster
    rates = {"fp32": 60e9, "bf16": 170e9 if rank == 0 else 6e9}
    precision.linear_rates = lambda modes, *a, **k: {m: rates[m] for m in modes}
    choice = precision.agree(precision.choose("auto", "cpu", threads=1))
    Path(f"{out}.{rank}").write_text(choice.precision)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_processes_agree_on_one_precision(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_agree_rank, args=(2, port, str(tmp_path / "p")), nprocs=2)
    assert [(tmp_path / f"p.{r}").read_text() for r in range(2)] == ["fp32", "fp32"]
