"""training/recipe_check.py: a recipe is checked before any work, through the CLI of both stages.

Each refusal: exit 2, one line on stderr naming the key (and the nearest valid name), and no run
folder left behind. `setup_accelerator` (the first piece of work in both stages) is replaced by
a trap, so a recipe that slips through fails the test at once instead of training.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from open_clip_cxr.cli import main
from training import common
from train_trap_fixtures import WorkStarted, refused as _refused, trap_work, write_tar  # noqa: F401 (trap_work: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "training" / "recipes"



def tiny_shard(tmp_path) -> str:
    return write_tar(tmp_path / "shards" / "train-000000.tar", 4)


def run_clip(tmp_path, *sets):
    argv = ["train-clip", "--recipe", str(RECIPES / "clip-cxr-llm-small-cpu.yaml"),
            "--set", f"data.train={tiny_shard(tmp_path)}", "--output-dir", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    return main(argv)


def run_text(tmp_path, *sets):
    argv = ["train-text", "--recipe", str(RECIPES / "text-cxr-llm-small-cpu.yaml"), "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    return main(argv)


def refused(capsys, tmp_path, rc, command, *needles):
    return _refused(capsys, tmp_path, rc, command, *needles, start='recipe key ')


@pytest.mark.parametrize("bad,needles", [
    ("train.epochz=3", ["`train.epochz`", "did you mean `train.epochs`?"]),
    ("data.batch_size=eight", ["`data.batch_size`", "whole number", "'eight'"]),
    ("data.batch_size=0", ["`data.batch_size`", "out of range"]),
    ("data.batch_size=-3", ["`data.batch_size`", "-3", "out of range"]),
    ("text.lr=abc", ["`text.lr`", "a number", "'abc'"]),
    ("vision.mode=frozen", ["`vision.mode`", "full, lora, locked"]),
    ("train.mixed_precision=fp8", ["`train.mixed_precision`", "auto"]),
    ("optim.grad_clip=-1", ["`optim.grad_clip`", "out of range"]),
    ("data.batchsize=8", ["did you mean `data.batch_size`?"]),
    ("train=3", ["`train`", "section"]),
])
def test_train_clip_refuses_bad_recipes(bad, needles, tmp_path, capsys):
    refused(capsys, tmp_path, run_clip(tmp_path, bad), "train-clip", *needles)


@pytest.mark.parametrize("bad,needles", [
    ("mntp.mask_prob=1.5", ["`mntp.mask_prob`", "1.5", "0 < mask_prob < 1"]),
    ("mntp.lr=abc", ["`mntp.lr`", "'abc'"]),
    ("mntp.batch_size=0", ["`mntp.batch_size`", "out of range"]),
    ("supcon.batch_size=eight", ["`supcon.batch_size`"]),
    ("supcon.temperature=0", ["`supcon.temperature`", "out of range"]),
    ("supcon.stepz=10", ["did you mean `supcon.steps`?"]),
    ("train.log_evry=5", ["did you mean `train.log_every`?"]),
    ("eval.enabled=maybe", ["`eval.enabled`", "true/false"]),
])
def test_train_text_refuses_bad_recipes_before_mntp(bad, needles, tmp_path, capsys):
    refused(capsys, tmp_path, run_text(tmp_path, bad), "train-text", *needles)


def test_a_refused_run_does_not_block_the_corrected_rerun(tmp_path, capsys):
    assert run_clip(tmp_path, "train.epochz=3") == 2
    with pytest.raises(WorkStarted):             # the corrected recipe reaches the work
        run_clip(tmp_path, "train.epochs=3")


@pytest.mark.parametrize("good", [[], ["train.mixed_precision=auto", "train.num_threads=auto"],
                                  ["train.log_with=null"], ["data.text_choice={report: 0.5, impression: 0.5}"]])
def test_valid_clip_recipes_reach_the_work(good, tmp_path):
    with pytest.raises(WorkStarted):
        run_clip(tmp_path, *good)


@pytest.mark.parametrize("good", [[], ["train.mixed_precision=auto"], ["supcon.lora=null"],
                                  ["supcon.lora={r: 8, alpha: 16, dropout: 0.1, target_modules: [q_proj], layers: 1}"]])
def test_valid_text_recipes_reach_the_work(good, tmp_path):
    with pytest.raises(WorkStarted):
        run_text(tmp_path, *good)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_pass(name):
    from training.recipe_check import check_recipe
    check_recipe(common.load_recipe(str(RECIPES / name)), "text" if name.startswith("text-") else "clip")


def test_library_callers_get_a_usage_error(tmp_path):
    from open_clip_cxr.errors import UsageError
    from training.text_stage import train
    with pytest.raises(UsageError, match="mntp.mask_prob"):
        train({"output_dir": str(tmp_path / "run"), "mntp": {"steps": 1, "batch_size": 2, "mask_prob": 1.5}})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train-text", "train-clip"])
def test_help_does_not_import_torch(command):
    """`train-text --help` / `train-clip --help` parse without importing torch (what makes them fast)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = ("import sys, runpy; sys.argv = ['open-clip-cxr', %r, '--help']\n"
             "try:\n    runpy.run_module('open_clip_cxr.cli', run_name='__main__', alter_sys=True)\n"
             "except SystemExit:\n    pass\nprint('torch' in sys.modules)" % command)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert "--recipe" in out.stdout and "--set" in out.stdout, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


@pytest.mark.parametrize("stage", ["text", "clip"])
def test_a_runs_saved_recipe_with_its_resolved_block_passes(stage):
    """A run folder's own recipe.yaml carries `resolved:` (what `auto` became); it is accepted back."""
    from training.recipe_check import check_recipe
    check_recipe({"resolved": {"precision": "bf16", "threads": 1, "ratio": 2.3}}, stage)


def test_stage1_variant_keys_of_the_llm_and_style_options_are_known():
    """`supcon.variants/paraphraser` (LLM rewrites) and `p_phrases/variant_styles` (style ablations) pass; a bad choice names the options."""
    from training.recipe_check import check_recipe
    check_recipe({"supcon": {"variants": "both", "paraphraser": "m", "p_phrases": 0.25, "variant_styles": None}}, "text")
    with pytest.raises(Exception, match="rules, llm, both"):
        check_recipe({"supcon": {"variants": "llmz"}}, "text")


def test_zero_steps_skips_a_phase_and_is_not_mistaken_for_an_eps():
    """`mntp.steps: 0` (skip MNTP) is valid; `*eps` once matched every key ending in "steps"."""
    from training.recipe_check import check_recipe
    check_recipe({"mntp": {"steps": 0}, "supcon": {"steps": 0}}, "text")


@pytest.mark.parametrize("key", ["train", "val"])
def test_shards_may_be_a_list_of_patterns(key):
    """The demo hands `data.train`/`data.val` over as a list of tar paths; a list is a valid value."""
    from training.recipe_check import check_recipe
    check_recipe({"data": {key: ["a/train-000000.tar", "a/train-000001.tar"]}}, "clip")
    with pytest.raises(Exception, match=f"data.{key}"):
        check_recipe({"data": {key: 3}}, "clip")
