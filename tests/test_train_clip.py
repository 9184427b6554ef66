"""training/clip_stage.py + cached_text.py on `cxr-llm-tiny` (random, ~240k params, 64 px), CPU.

Shards are written here with webdataset's TarWriter: tiny grey images whose brightness
encodes one of eight findings, and matching hand-written reports.
"""
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from open_clip_cxr_train import common
from open_clip_cxr_train.clip_stage import (ContrastiveModel, build_loss, build_model, compute_loss, epoch_batches,
                                 frozen_base_cast, merge_vision_lora, param_groups, train, transformer_blocks,
                                 with_defaults)

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ["no acute cardiopulmonary process", "right lower lobe pneumonia", "large left pleural effusion",
            "cardiomegaly with mild pulmonary edema", "small right apical pneumothorax",
            "left upper lobe pulmonary nodule", "bibasilar atelectasis", "endotracheal tube in good position"]


def write_shards(out: Path, split: str, n: int, per_shard: int = 8, seed: int = 0):
    import webdataset as wds
    from PIL import Image
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(0, n, per_shard):
        with wds.TarWriter(str(out / f"{split}-{s // per_shard:06d}.tar")) as w:
            for i in range(s, min(n, s + per_shard)):
                c = i % len(FINDINGS)
                img = (np.full((48, 40), 28 * c, np.uint8) + rng.integers(0, 16, (48, 40), dtype=np.uint8))
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                w.write({"__key__": f"{split}{i:05d}", "png": buf.getvalue(),
                         "txt": f"FINDINGS: {FINDINGS[c]}. IMPRESSION: {FINDINGS[c]}.".encode(),
                         "json": json.dumps({"study_id": f"{split}-s{i}", "split": split}).encode()})
    last = (n - 1) // per_shard
    return str(out / f"{split}-{{000000..{last:06d}}}.tar") if last else str(out / f"{split}-000000.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return {"train": write_shards(d, "train", 32), "val": write_shards(d, "val", 8, seed=1)}


pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")   # conftest.py


def recipe(shards, out, **over):
    r = {"model": "cxr-llm-tiny", "pretrained_image": False, "output_dir": str(out), "seed": 0,
         "data": {"train": shards["train"], "val": None, "epoch_samples": 32, "batch_size": 8,
                  "shuffle_buffer": 16, "resume": "skip"},
         "text": {"lr": 2e-3, "head_lr": 2e-3}, "vision": {"lr": 2e-3},
         "schedule": {"warmup_steps": 1},
         "train": {"epochs": 1, "log_every": 1, "checkpoint_every": 100, "log_with": None, "export": False}}
    for key, value in over.items():
        common.set_by_path(r, key.replace("__", "."), value)
    return r


def read_metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out) -> dict:
    """{step: logged training loss} of a run folder."""
    return {x["step"]: x["loss"] for x in read_metrics(out) if "loss" in x}


# ---------------------------------------------------------------- end to end

def test_train_end_to_end_with_val_and_export(shards, tmp_path):
    import open_clip
    r = recipe(shards, tmp_path / "run", data__val=shards["val"], train__epochs=2, train__export=True,
               train__log_with="tensorboard", train__grad_accum_steps=2)
    final = train(r)
    assert final["step"] == 4 and final["epoch"] == 2 and final["samples_seen"] == 64   # 32/8 /2 accum x 2
    for k in ("val/i2t_R@1", "val/i2t_R@5", "val/t2i_R@10", "val/mean_recall"):
        assert 0.0 <= final[k] <= 1.0
    rows = read_metrics(tmp_path / "run")
    steps = [x for x in rows if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(x["loss"]) and x["samples_per_s"] > 0 and x["mfu"] > 0 and x["tokens_per_s"] > 0
               for x in steps)
    assert sum("val/mean_recall" in x for x in rows) == 2
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))          # TensorBoard
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint-4"]
    # the export loads back as an OpenCLIP model with the same embeddings
    exported = open_clip.create_model(f"local-dir:{final['export_dir']}")
    assert exported.text.transformer.has_lora is False
    assert (tmp_path / "run" / "final_metrics.json").exists()


def test_loss_falls_overfitting_one_batch(shards):
    r = with_defaults(recipe(shards, "unused"))
    acc = common.setup_accelerator(r)
    model, pre_train, _, tok, _ = build_model(r)
    images, tokens, _ = next(epoch_batches(r, pre_train, tok, acc, 0, 0, False))
    net, loss_fn = ContrastiveModel(model), build_loss(r, acc)
    opt = torch.optim.AdamW(param_groups(model, r))
    losses = []
    for _ in range(15):
        loss = compute_loss(loss_fn, net(images, tokens))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_trainable_parts_and_param_groups(shards):
    r = with_defaults(recipe(shards, "unused"))
    model, *_ = build_model(r)
    tower = model.text.transformer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable if n.startswith("text.transformer.llm"))
    assert any("lora_" in n for n in trainable)
    assert not any(p.requires_grad for n, p in tower.llm.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in tower.norm.parameters()) and model.text.proj.weight.requires_grad
    assert all(p.requires_grad for p in model.visual.parameters())
    groups = {g["name"]: g for g in param_groups(model, r)}
    assert set(groups) >= {"text_lora", "text_head", "vision", "vision_no_decay", "logit"}
    assert groups["logit"]["weight_decay"] == 0 and groups["text_head_no_decay"]["weight_decay"] == 0
    assert any(p is tower.norm.weight for p in groups["text_head_no_decay"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)


def _lora_grads(r):
    torch.manual_seed(0)
    model, *_ = build_model(r)
    acc = common.setup_accelerator(r)
    g = torch.Generator().manual_seed(0)
    out = ContrastiveModel(model)(torch.randn(4, 3, 64, 64, generator=g), torch.randint(4, 200, (4, 10), generator=g))
    compute_loss(build_loss(r, acc), out).backward()
    return model, {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}


def test_grad_checkpointing_keeps_lora_grads(shards):
    model, with_ckpt = _lora_grads(with_defaults(recipe(shards, "unused", train__grad_checkpointing=True)))
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.text.transformer.modules())
    _, without = _lora_grads(with_defaults(recipe(shards, "unused")))
    assert with_ckpt and all(g is not None and g.abs().sum() > 0 for g in with_ckpt.values())
    for n in without:
        torch.testing.assert_close(with_ckpt[n], without[n], msg=n)


def test_siglip_and_vision_lora(shards):
    r = with_defaults(recipe(shards, "unused", loss__name="siglip", vision__mode="lora",
                             vision__lora={"r": 2, "alpha": 4, "dropout": 0.0,
                                           "target_modules": ["conv_pw", "conv_pwl"]}))
    model, *_ = build_model(r)
    acc = common.setup_accelerator(r)
    assert model.logit_bias is not None
    trunk_trainable = [n for n, p in model.visual.trunk.named_parameters() if p.requires_grad]
    assert trunk_trainable and all("lora_" in n for n in trunk_trainable)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    loss = compute_loss(build_loss(r, acc), ContrastiveModel(model)(x, torch.randint(4, 200, (2, 8))))
    loss.backward()
    for n, p in model.visual.trunk.named_parameters():   # make the adapters non-trivial
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    before = model.encode_image(x)
    merge_vision_lora(model)
    assert not any("lora_" in n for n, _ in model.visual.named_parameters())
    torch.testing.assert_close(model.encode_image(x), before, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- speed options

def test_frozen_base_in_bf16_keeps_trainables_fp32_and_restores_exact_weights(shards):
    r = with_defaults(recipe(shards, "unused", train__mixed_precision="bf16", train__cpu=True))
    acc = common.setup_accelerator(r)
    model, *_ = build_model(r)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast = frozen_base_cast(model, r, acc)
    frozen = {n for n, p in model.text.transformer.llm.named_parameters() if not p.requires_grad}
    assert frozen and cast.n_cast == sum(p.numel() for p in model.text.transformer.llm.parameters() if not p.requires_grad)
    for n, p in model.named_parameters():
        short = n[len("text.transformer.llm."):]
        assert p.dtype == (torch.bfloat16 if n.startswith("text.transformer.llm.") and short in frozen
                           else torch.float32), n
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # a bf16 autocast step runs and reaches the LoRA adapters
    g = torch.Generator().manual_seed(0)
    with acc.autocast():
        out = ContrastiveModel(model)(torch.randn(4, 3, 64, 64, generator=g), torch.randint(4, 200, (4, 10), generator=g))
        loss = compute_loss(build_loss(r, acc), out)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    cast.restore()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    # off without mixed precision (nothing to cast to) and in the cached mode (no LLM in the step)
    common.reset_accelerator_state()
    fp32 = with_defaults(recipe(shards, "unused"))
    assert frozen_base_cast(model, fp32, common.setup_accelerator(fp32)).n_cast == 0
    assert frozen_base_cast(model, {**r, "text": {**r["text"], "cached": True}}, acc).n_cast == 0


def test_frozen_bf16_base_run_exports_the_fp32_base(shards, tmp_path):
    def gate_weights(export_dir):
        from safetensors.torch import load_file
        sd = load_file(str(Path(export_dir) / "open_clip_model.safetensors"))
        return {k: v for k, v in sd.items() if "gate_proj" in k}
    runs = {}
    for on in (True, False):
        common.reset_accelerator_state()
        runs[on] = train(recipe(shards, tmp_path / str(on), train__mixed_precision="bf16", train__cpu=True,
                                train__frozen_low_precision=on, train__export=True))
    cast, plain = gate_weights(runs[True]["export_dir"]), gate_weights(runs[False]["export_dir"])
    assert cast and cast.keys() == plain.keys()
    for k in cast:   # frozen, never LoRA-adapted: the exact fp32 weights, not their bf16 copy
        assert cast[k].dtype == torch.float32 and torch.equal(cast[k], plain[k]), k
        assert not torch.equal(cast[k], cast[k].bfloat16().float()), k
    # the same step in bf16, whether autocast casts the weights or they are stored cast
    assert step_losses(tmp_path / "True")[1] == pytest.approx(step_losses(tmp_path / "False")[1], rel=2e-2)


def test_compiled_blocks_train_like_eager_with_the_same_checkpoint_keys(shards, tmp_path):
    from safetensors.torch import load_file
    model, *_ = build_model(with_defaults(recipe(shards, "unused")))
    blocks = transformer_blocks(model)
    assert len(blocks) == len(model.visual.trunk.blocks) + model.text.config.llm_config().num_hidden_layers
    assert len(transformer_blocks(model, cached=True)) == len(model.visual.trunk.blocks)
    losses, keys = {}, {}
    # aot_eager: the real dynamo + AOTAutograd tracing in seconds (inductor's C++ build takes minutes
    # here); fp32, so the compiled step must match the eager one to rounding
    for name, comp in (("eager", False), ("compiled", {"backend": "aot_eager"})):
        common.reset_accelerator_state()
        train(recipe(shards, tmp_path / name, train__compile=comp, train__checkpoint_every=2))
        losses[name] = list(step_losses(tmp_path / name).values())
        keys[name] = set(load_file(str(tmp_path / name / "checkpoints" / "checkpoint-4" / "model.safetensors")))
    assert len(losses["compiled"]) == 4
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-4)
    assert keys["compiled"] == keys["eager"]   # in-place compilation: no `_orig_mod.` prefixes


@pytest.mark.slow   # ~2 min: inductor builds C++ kernels on the CPU
def test_inductor_compiled_training_matches_eager(shards, tmp_path):
    losses = {}
    for name, comp in (("eager", False), ("inductor", True)):
        common.reset_accelerator_state()   # tiny's LoRA has no dropout: inductor's own RNG does not enter
        train(recipe(shards, tmp_path / name, train__compile=comp))
        losses[name] = list(step_losses(tmp_path / name).values())
    np.testing.assert_allclose(losses["inductor"], losses["eager"], rtol=1e-3)


# ---------------------------------------------------------------- resume

def test_kill_and_resume_matches_uninterrupted(shards, tmp_path):
    base = dict(train__checkpoint_every=2, train__epochs=2)    # 8 steps, 4 per epoch
    full = train(recipe(shards, tmp_path / "full", **base))
    assert full["step"] == 8
    # "killed" right after the checkpoint at step 3 (mid-epoch), then resumed in a new process state
    stopped = train(recipe(shards, tmp_path / "cut", **{**base, "train__checkpoint_every": 3, "train__stop_after": 3}))
    assert stopped["stopped_at"] == 3
    common.reset_accelerator_state()
    resumed = train(recipe(shards, tmp_path / "cut", **{**base, "train__checkpoint_every": 3}))
    assert resumed["step"] == 8 and resumed["samples_seen"] == full["samples_seen"]
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 9))
    for step in range(4, 9):          # every step after the interruption, across the epoch boundary
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])


def test_reseed_resume_draws_new_batches(shards):
    r = with_defaults(recipe(shards, "unused"))
    acc = common.setup_accelerator(r)
    model, pre, _, tok, _ = build_model(r)
    first = [k for _, _, keys in list(epoch_batches(r, pre, tok, acc, 0, 0, False))[:3] for k in keys]
    skip = next(epoch_batches(r, pre, tok, acc, 0, 2, False))[2]
    assert skip == first[16:24]                    # "skip": the stream continues where it stopped
    r["data"]["resume"] = "reseed"
    reseeded = next(epoch_batches(r, pre, tok, acc, 0, 2, False))[2]
    assert reseeded != skip                        # "reseed": a fresh stream, not a replay


# ---------------------------------------------------------------- cached text

def test_cached_text_mode(shards, tmp_path):
    from open_clip_cxr_train import cached_text
    r = recipe(shards, tmp_path / "cached", text__cached=True, data__val=shards["val"])
    final = train(r)
    assert final["step"] == 4 and np.isfinite(final["loss"]) and "val/mean_recall" in final
    cache = cached_text.TextFeatureCache(tmp_path / "cached" / "text_cache")
    assert len(cache) == 32 and cache.features.shape[1] == 64
    # the cached vector is the pooled output before tower.norm: norm+proj of it == the full tower
    common.reset_accelerator_state()
    rr = with_defaults(r)
    common.setup_accelerator(rr)          # same seed -> the same random tower as the run's
    model, _, _, tok, _ = build_model(rr)
    model.eval()
    text = next(cached_text.iter_reports(shards["train"]))
    pooled = cached_text.pooled_before_norm(model, tok([text[1]]))
    torch.testing.assert_close(cached_text.text_head(model, pooled), model.encode_text(tok([text[1]])))
    torch.testing.assert_close(cache([text[0]]), pooled, rtol=1e-2, atol=1e-2)   # stored as float16
    with pytest.raises(KeyError, match="not in the text cache"):
        cache(["nope"])


# ---------------------------------------------------------------- two processes

MULTI_PROCESS_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from open_clip_cxr_train import common
    from open_clip_cxr_train.clip_stage import (with_defaults, build_model, ContrastiveModel, build_loss, compute_loss,
                                     param_groups, is_fsdp2, scalars_to_1d, full_value)

    # accelerate runs FSDP only on accelerators and quietly falls back to plain multi-CPU data
    # parallel. Under `accelerate launch --config_file fsdp.yaml` (which sets the FSDP plugin) this
    # makes the gloo group an FSDP one, so accelerate's own FSDP2 code (fully_shard, sharded
    # checkpoints, full state dict) runs on the CPU.
    def fsdp_on_cpu():
        init = AcceleratorState.__init__
        def patched(self, *args, fsdp_plugin=None, **kwargs):
            init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
                self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState.__init__ = patched

    def grads_after_one_step(out_path, global_batch=8):
        recipe = with_defaults({"model": "cxr-llm-tiny", "pretrained_image": False})
        acc = Accelerator(cpu=True)
        torch.manual_seed(0)
        model, *_ = build_model(recipe)
        model.eval()    # BatchNorm batch statistics and dropout off: compare the loss's gathering only
        if is_fsdp2(acc):
            scalars_to_1d(model)
        g = torch.Generator().manual_seed(1)
        images = torch.randn(global_batch, 3, 64, 64, generator=g)
        tokens = torch.randint(4, 260, (global_batch, 12), generator=g)
        n, r = global_batch // acc.num_processes, acc.process_index
        opt = torch.optim.SGD(param_groups(model, recipe), lr=0.1)
        net, opt = acc.prepare(ContrastiveModel(model), opt)
        loss = compute_loss(build_loss(recipe, acc), net(images[r * n:(r + 1) * n], tokens[r * n:(r + 1) * n]))
        acc.backward(loss)
        clip = acc.unwrap_model(net).clip
        # full_value: FSDP2 holds a shard of each tensor per rank
        grads = {k: full_value(p.grad).detach().clone() for k, p in clip.named_parameters() if p.grad is not None}
        opt.step()
        params = {k: full_value(p).detach().clone() for k, p in clip.named_parameters() if p.requires_grad}
        loss = acc.reduce(loss.detach(), "mean")
        if acc.is_main_process:
            torch.save({"grads": grads, "params": params, "loss": loss.item(), "world": acc.num_processes,
                        "type": acc.distributed_type.value}, out_path)

    if __name__ == "__main__":
        fsdp_on_cpu()
        if sys.argv[1] != "none":
            grads_after_one_step(sys.argv[1])
        if len(sys.argv) > 2:   # then a whole run on 2 ranks: reduce, checkpoint, resume, validation, export
            from open_clip_cxr_train.clip_stage import train
            common.reset_accelerator_state()
            final = train(json.loads(sys.argv[2]))
            sys.stdout.flush()
            os.write(1, f"FINAL {json.dumps(final)}\\n".encode())   # one write: ranks share the pipe
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, launch_args, step_out="none", run_recipe=None, port=None):
    """`accelerate launch` MULTI_PROCESS_SCRIPT on 2 CPU processes (one step, then one run)."""
    script = tmp_path / "two_step.py"
    script.write_text(MULTI_PROCESS_SCRIPT)
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if "--num_machines" not in launch_args:
        launch_args = [*launch_args, "--num_machines", "1"]
    cmd = [str(accelerate), "launch", *launch_args, "--num_processes", "2",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or _free_port()),
           str(script), str(step_out), *([json.dumps(run_recipe)] if run_recipe else [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _two_processes(tmp_path, launch_args, run_recipe):
    """The 2-process step and run; meanwhile the single-process reference step here.
    Returns (the launch's output, its step, the reference step)."""
    proc = _launch(tmp_path, launch_args, tmp_path / "multi.pt", run_recipe)
    sys.path.insert(0, str(tmp_path))
    try:
        import two_step
        two_step.grads_after_one_step(str(tmp_path / "single.pt"))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("two_step", None)
    out = _finish(proc)
    return out, torch.load(tmp_path / "multi.pt", weights_only=True), torch.load(tmp_path / "single.pt", weights_only=True)


def _assert_same_step(multi, single):
    assert multi["world"] == 2 and single["world"] == 1
    assert multi["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert set(multi["grads"]) == set(single["grads"]) and len(multi["grads"]) > 10
    for k in single["grads"]:   # (FSDP2 trains the 0-d logit_scale as shape [1])
        torch.testing.assert_close(multi["grads"][k].reshape(single["grads"][k].shape), single["grads"][k],
                                   rtol=1e-4, atol=1e-5, msg=k)
    for k in single["params"]:
        torch.testing.assert_close(multi["params"][k].reshape(single["params"][k].shape), single["params"][k],
                                   rtol=0, atol=1e-5, msg=k)


def _finals(out):
    # anywhere in a line: the other rank's stderr (warnings) can share the line in the pipe
    return [json.loads(m) for m in re.findall(r"FINAL (\{.*\})", out)]


@pytest.mark.slow   # ~45 s on the shared 2-core CPU: two fresh Python processes importing torch + transformers
def test_two_process_gradients_match_single_process(shards, tmp_path):
    # `--cpu` alone would start ONE process (accelerate wants mpirun for multi-CPU); torchrun
    # (`--multi_gpu`) starts two, and `Accelerator(cpu=True)` makes them a gloo (MULTI_CPU) group.
    out, ddp, single = _two_processes(tmp_path, ["--multi_gpu"], recipe(
        shards, tmp_path / "ddp_run", data__val=shards["val"], train__cpu=True,
        train__export=True, train__checkpoint_every=1, data__resume="reseed"))
    finals = _finals(out)
    assert len(finals) == 2 and all(f["step"] == 2 for f in finals), out[-3000:]
    final = max(finals, key=len)                                            # the main process's (with validation)
    assert final["step"] == 2 and final["samples_seen"] == 32 and "val/mean_recall" in final   # 8 x 2 ranks x 2
    assert len(read_metrics(tmp_path / "ddp_run")) == 3                      # one writer: 2 steps + 1 validation
    assert (tmp_path / "ddp_run" / "export" / "open_clip_model.safetensors").exists()
    assert ddp["type"] == "MULTI_CPU"
    _assert_same_step(ddp, single)


@pytest.mark.slow   # ~40 s
def test_multinode_config_runs_as_two_nodes_on_one_machine(shards, tmp_path):
    """`ddp_multinode.yaml` as two "nodes" of one process each, both on localhost (static
    rendezvous, node 0's address): both train, one writes, the export exists."""
    cfg = str(ROOT / "training" / "recipes" / "accelerate" / "ddp_multinode.yaml")
    port = _free_port()
    run = recipe(shards, tmp_path / "run", data__val=shards["val"], train__cpu=True, train__export=True)
    nodes = [_launch(tmp_path, ["--config_file", cfg, "--num_machines", "2", "--machine_rank", str(rank),
                                "--main_process_ip", "127.0.0.1"], run_recipe=run, port=port) for rank in (0, 1)]
    finals = [f for proc in nodes for f in _finals(_finish(proc))]
    assert len(finals) == 2 and all(f["step"] == 2 and f["samples_seen"] == 32 for f in finals)
    assert "val/mean_recall" in finals[0] and "val/mean_recall" not in finals[1]   # node 0 holds the main process
    assert len(read_metrics(tmp_path / "run")) == 3
    assert (tmp_path / "run" / "export" / "open_clip_model.safetensors").exists()


@pytest.mark.slow   # ~80 s: three 2-process launches
def test_fsdp2_recipe_trains_resumes_and_exports(shards, tmp_path):
    """`training/recipes/accelerate/fsdp.yaml` (FSDP2, sharded checkpoints) on 2 CPU processes:
    the sharded step equals the single-process one, a stopped run (gradient checkpointing on)
    resumes exactly from its sharded checkpoint, validation runs on every rank, and the export
    gathers the shards."""
    import open_clip_cxr
    # the config as shipped, but wrapping only the decoder layers: cxr-llm-tiny has no EVA blocks
    fsdp_args = ["--config_file", str(ROOT / "training" / "recipes" / "accelerate" / "fsdp.yaml"),
                 "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]
    # with gradient checkpointing, as the paper's recipe trains
    base = dict(train__cpu=True, data__resume="skip", data__epoch_samples=64, train__checkpoint_every=2,
                train__grad_checkpointing=True)
    out, fsdp, single = _two_processes(tmp_path, fsdp_args, recipe(
        shards, tmp_path / "full", **base, data__val=shards["val"], train__export=True))
    assert fsdp["type"] == "FSDP"
    _assert_same_step(fsdp, single)
    full = max(_finals(out), key=len)
    assert full["step"] == 4 and "val/mean_recall" in full
    # "killed" after the checkpoint at step 2, then resumed by a new launch
    stopped = _finals(_finish(_launch(tmp_path, fsdp_args, run_recipe=recipe(
        shards, tmp_path / "cut", **base, train__stop_after=2))))
    assert [f["stopped_at"] for f in stopped] == [2, 2]
    resumed = _finals(_finish(_launch(tmp_path, fsdp_args, run_recipe=recipe(shards, tmp_path / "cut", **base))))
    assert [f["step"] for f in resumed] == [4, 4]
    a, b = step_losses(tmp_path / "full"), step_losses(tmp_path / "cut")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):          # after the restart: restored from the sharded checkpoint
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])
    # the export: gathered from the shards, logit_scale back to OpenCLIP's 0-d shape, reloadable
    model = open_clip_cxr.create_model(f"local-dir:{tmp_path / 'full' / 'export'}")
    last = [x for x in read_metrics(tmp_path / "full") if "logit_scale" in x][-1]
    assert model.logit_scale.shape == () and model.logit_scale.exp().item() == pytest.approx(last["logit_scale"], rel=1e-5)


# ---------------------------------------------------------------- recipes and CLI

@pytest.mark.parametrize("name", ["clip-cxr-llm.yaml", "clip-cxr-llm-small-cpu.yaml"])
def test_recipe_files_are_complete(name):
    from open_clip_cxr_train.clip_stage import DEFAULT_RECIPE
    r = common.load_recipe(str(ROOT / "training" / "recipes" / name))
    for section, values in r.items():
        assert section in DEFAULT_RECIPE, section
        if isinstance(values, dict) and isinstance(DEFAULT_RECIPE[section], dict):
            assert set(values) <= set(DEFAULT_RECIPE[section]), (section, set(values) - set(DEFAULT_RECIPE[section]))
    assert r["text"]["lora"] == {"r": 16, "alpha": 32, "dropout": 0.1,
                                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert isinstance(r["text"]["lr"], float) and r["train"]["mixed_precision"] in ("no", "bf16", "auto")
    for cfg in ("ddp_1node", "ddp_multinode", "fsdp", "deepspeed_zero2"):
        acc_cfg = common.load_recipe(str(ROOT / "training" / "recipes" / "accelerate" / f"{cfg}.yaml"))
        assert acc_cfg["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED") and acc_cfg["num_processes"] >= 8


def test_fsdp_config_wraps_layers_that_cxr_llm_has():
    """accelerate refuses to start when a class named in the FSDP wrap policy is missing."""
    import open_clip_cxr
    cfg = common.load_recipe(str(ROOT / "training" / "recipes" / "accelerate" / "fsdp.yaml"))["fsdp_config"]
    with torch.device("meta"):   # the paper's 1.6B-parameter model, without memory or weights
        model = open_clip_cxr.create_model("cxr-llm", pretrained_text=False, pretrained_image=False, device="meta")
    classes = {type(m).__name__ for m in model.modules()}
    wrapped = cfg["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert set(wrapped) <= classes, set(wrapped) - classes


def test_cli_train_clip(shards, tmp_path, capsys):
    from open_clip_cxr.cli import main
    out = tmp_path / "cli"
    rc = main(["train-clip", "--recipe", str(ROOT / "training" / "recipes" / "clip-cxr-llm-small-cpu.yaml"),
               "--set", "model=cxr-llm-tiny", "--set", "pretrained_image=false", "--set", f"data.train={shards['train']}",
               "--set", "data.epoch_samples=16", "--set", "train.export=false", "--set", "train.log_with=none",
               "--output-dir", str(out), "--max-steps", "2"])
    assert rc == 0
    assert '"step": 2' in capsys.readouterr().out
    assert json.loads((out / "final_metrics.json").read_text())["step"] == 2
    assert (out / "recipe.yaml").exists() and (out / "checkpoints" / "checkpoint-2").is_dir()
