"""Where the CLIP stage's towers get their weights (training/towers.py), on `cxr-llm-tiny`, CPU.

Stage 1 runs here for one MNTP and one contrastive step; its export then starts stage 2.
`cxr-llm-tiny`'s vision trunk is timm's `test_efficientnet`, whose pretrained weights live on
the Hub: the tests give timm a local file instead (its own `pretrained_cfg.file` path, the way
`cxr_efficientnet_lite0` gets its ImageNet weights offline), so `pretrained_image=True` loads
real, non-initial weights through timm's loader.
"""
import json
from pathlib import Path

import pytest
import torch

import data_fixtures as fx
from open_clip_cxr_train import common

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread_fresh_accelerate")   # conftest.py


@pytest.fixture(scope="module")
def pretrained_trunk(tmp_path_factory):
    """A test_efficientnet checkpoint with non-initial weights (1000 classes, as timm's releases),
    registered as timm's pretrained file for `test_efficientnet` while the module's tests run."""
    import timm
    from safetensors.torch import save_file
    from timm.models._registry import _model_pretrained_cfgs
    torch.manual_seed(123)
    net = timm.create_model("test_efficientnet", pretrained=False)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    path = tmp_path_factory.mktemp("timm") / "test_efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    cfg = _model_pretrained_cfgs["test_efficientnet.r160_in1k"]
    mp = pytest.MonkeyPatch()
    mp.setattr(cfg, "file", str(path))
    yield path
    mp.undo()


def fresh_pretrained_build():
    import open_clip_cxr
    return open_clip_cxr.create_model("cxr-llm-tiny", pretrained_image=True, pretrained_text=False)


def state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} of {len(a)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, pretrained_trunk):
    """A stage-1 export of cxr-llm-tiny (1 MNTP + 1 contrastive step on hand-written reports)."""
    from open_clip_cxr_train.text_stage import train
    tmp = tmp_path_factory.mktemp("stage1")
    rows = [{"study": f"s{i}", "findings": f, "impression": im, "split": "train"} for i, (f, im) in enumerate(fx.REPORTS)]
    (tmp / "reports.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = common.load_recipe(str(ROOT / "training/recipes/text-cxr-llm-small-cpu.yaml"), [
        "model=cxr-llm-tiny", "max_length=64", "train.log_with=none", "train.num_threads=1",
        "mntp.steps=1", "mntp.batch_size=4", "supcon.steps=1", "supcon.batch_size=4", "supcon.cache=false",
        "supcon.warmup_steps=1", "eval.enabled=false"])
    recipe["data"] = {"source": "table", "path": str(tmp / "reports.jsonl"), "findings_col": "findings",
                      "impression_col": "impression", "study_col": "study", "split_col": "split"}
    recipe["output_dir"] = str(tmp / "out")
    common.reset_accelerator_state()
    train(recipe)
    common.reset_accelerator_state()
    return Path(recipe["output_dir"])


def clip_recipe(**over) -> dict:
    from open_clip_cxr_train.clip_stage import with_defaults
    r = {"model": "cxr-llm-tiny", "pretrained_image": True, "pretrained_text": False, "seed": 0,
         "train": {"log_with": None}}
    for k, v in over.items():
        common.set_by_path(r, k.replace("__", "."), v)
    return with_defaults(r)


def build(recipe):
    from open_clip_cxr_train.clip_stage import build_model
    lines = []
    model = build_model(recipe, log=lines.append)[0]
    return model, "\n".join(lines)


# ---------------------------------------------------------------- the issue: stage 2 from stage 1

def test_stage1_export_records_an_untrained_vision_tower(stage1):
    prov = json.loads((stage1 / "open_clip_config.json").read_text())["provenance"]
    assert prov["vision"]["trained"] is False and prov["vision"]["init"] == "random"
    assert prov["text"]["trained"] is True and "train-text" in prov["text"]["by"]


@pytest.mark.parametrize("spelling", ["model=local-dir", "text.from=local-dir"])
def test_stage2_from_stage1_gets_pretrained_vision_weights(stage1, spelling):
    """The failing case of issue 20: `pretrained_image: true` from a stage-1 folder kept the
    folder's random vision tower. At step 0 the trunk must equal a fresh pretrained build and the
    text tower the stage-1 export."""
    from open_clip_cxr_train.towers import folder_state_dict, sub_state
    if spelling == "model=local-dir":
        recipe = clip_recipe(model=f"local-dir:{stage1}")
    else:
        recipe = clip_recipe(text__from=f"local-dir:{stage1}")
    model, log = build(recipe)
    assert_same(state(model.visual.trunk), state(fresh_pretrained_build().visual.trunk))
    stage1_text = sub_state(folder_state_dict(f"local-dir:{stage1}"), "text.")
    model.text.transformer.merge_lora()   # the LoRA the CLIP stage adds starts at zero
    assert_same(state(model.text), stage1_text)
    assert "vision tower: pretrained weights of test_efficientnet" in log and "never trained" in log
    assert f"text tower: local-dir:{stage1}" in log
    if spelling == "model=local-dir":
        assert f"read as text.from=local-dir:{stage1}" in log


def test_folder_without_provenance_is_read_from_its_weights(stage1, tmp_path):
    """Older stage-1 exports have no provenance: their vision norms at init say 'never trained'."""
    import shutil
    old = tmp_path / "old-stage1"
    shutil.copytree(stage1, old)
    cfg = json.loads((old / "open_clip_config.json").read_text())
    del cfg["provenance"]
    (old / "open_clip_config.json").write_text(json.dumps(cfg))
    model, log = build(clip_recipe(model=f"local-dir:{old}"))
    assert_same(state(model.visual.trunk), state(fresh_pretrained_build().visual.trunk))
    assert "initial values (never trained)" in log


def test_pretrained_image_false_is_random_and_says_so(stage1):
    from open_clip_cxr_train.towers import norms_at_init
    model, log = build(clip_recipe(text__from=f"local-dir:{stage1}", pretrained_image=False))
    assert norms_at_init(model.visual) is True
    assert "vision tower: RANDOM initialisation (pretrained_image: false" in log


def test_train_logs_origins_and_a_trained_clip_keeps_its_vision(stage1, tmp_path, capsys):
    """A CLIP run records its towers; a second run from its export keeps that trained vision
    tower (auto), or takes the pretrained one when asked (vision.from: pretrained)."""
    from test_train_clip import write_shards
    from open_clip_cxr_train.clip_stage import train
    from open_clip_cxr_train.towers import folder_state_dict, sub_state
    train_urls = write_shards(tmp_path / "shards", "train", 16)
    r = clip_recipe(text__from=f"local-dir:{stage1}", output_dir=str(tmp_path / "clip"),
                    data={"train": train_urls, "epoch_samples": 16, "batch_size": 8, "shuffle_buffer": 8,
                          "resume": "skip"},
                    train={"epochs": 1, "max_steps": 2, "log_every": 1, "log_with": None, "export": True})
    final = train(r)
    out = capsys.readouterr().out
    assert "vision tower: pretrained weights of test_efficientnet" in out
    assert final["weights"]["vision"].startswith("pretrained weights of test_efficientnet")
    assert final["weights"]["text"].startswith(f"local-dir:{stage1}")
    export = Path(final["export_dir"])
    prov = json.loads((export / "open_clip_config.json").read_text())["provenance"]
    assert prov["vision"]["trained"] is True and prov["vision"]["init"] == "pretrained:test_efficientnet"
    assert prov["text"]["source"]["by"].startswith("train-text")

    common.reset_accelerator_state()
    model, log = build(clip_recipe(model=f"local-dir:{export}"))
    assert_same(state(model.visual), sub_state(folder_state_dict(f"local-dir:{export}"), "visual."))
    assert "trained by train-clip" in log
    model, log = build(clip_recipe(model=f"local-dir:{export}", vision__from="pretrained"))
    assert_same(state(model.visual.trunk), state(fresh_pretrained_build().visual.trunk))


def test_vision_from_a_timm_file(pretrained_trunk, tmp_path):
    """A trunk checkpoint file: its classifier is dropped, everything else must fit."""
    from safetensors.torch import load_file, save_file
    model, log = build(clip_recipe(pretrained_image=False, vision__from=str(pretrained_trunk)))
    saved = load_file(str(pretrained_trunk))
    got = state(model.visual.trunk)
    assert_same(got, {k: saved[k] for k in got})
    assert f"timm trunk weights from the file {pretrained_trunk}" in log
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in list(saved.items())[5:]}, str(partial))
    with pytest.raises(ValueError, match="lacks 5 trunk weights"):
        build(clip_recipe(vision__from=str(partial)))


def test_a_vision_source_still_at_init_is_refused(stage1, tmp_path):
    """vision.from names weights that are a random initialisation: an error, not a silent run."""
    with pytest.raises(ValueError, match="normalisation layers are all at their initial values"):
        build(clip_recipe(text__from=f"local-dir:{stage1}", vision__from="source"))
    import timm
    from safetensors.torch import save_file
    net = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="normalisation layers are all at their initial values"):
        build(clip_recipe(vision__from=str(path)))


def test_text_from_a_model_name_and_bad_sources():
    model, log = build(clip_recipe(text__from="cxr-llm-tiny", pretrained_image=False))
    assert "text tower: cxr-llm-tiny's text tower" in log
    with pytest.raises(ValueError, match="neither a local-dir"):
        build(clip_recipe(text__from="no-such-model"))
    with pytest.raises(ValueError, match="vision.from='imagenet'"):
        build(clip_recipe(vision__from="imagenet"))
    with pytest.raises(ValueError, match="not a local-dir:/hf-hub: folder"):
        build(clip_recipe(vision__from="source"))


def test_norms_at_init_on_timm_nets():
    import timm
    from open_clip_cxr_train.towers import norms_at_init
    net = timm.create_model("test_efficientnet", pretrained=False)
    assert norms_at_init(net) is True
    net.train()
    net(torch.randn(2, 3, 64, 64))   # one train-mode forward moves the BatchNorm running stats
    assert norms_at_init(net) is False
    assert norms_at_init(torch.nn.Linear(3, 3)) is None


def test_demo_moves_a_clip_run_of_the_old_recipe_aside(tmp_path):
    """An earlier demo's CLIP run (started with model=local-dir:stage1, a random vision tower)
    is kept aside rather than resumed under the new recipe; the same recipe is left alone."""
    import yaml
    from open_clip_cxr_train import clip_stage as cs
    from open_clip_cxr_train.demo import _move_aside_if_other_recipe
    new = cs.with_defaults({"model": "cxr-llm-small", "text": {"from": f"local-dir:{tmp_path / 'stage1'}"}})
    old = {"model": f"local-dir:{tmp_path / 'stage1'}"}
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "recipe.yaml").write_text(yaml.safe_dump(old))
    _move_aside_if_other_recipe(tmp_path, "clip", new, cs.DEFAULT_RECIPE)
    assert not (tmp_path / "clip").exists() and (tmp_path / "clip.previous-1" / "recipe.yaml").exists()
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "recipe.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(new))))
    _move_aside_if_other_recipe(tmp_path, "clip", new, cs.DEFAULT_RECIPE)
    assert (tmp_path / "clip" / "recipe.yaml").exists()
