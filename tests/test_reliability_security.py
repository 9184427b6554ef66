"""Catalogue: nothing from a checkpoint or a folder runs as code, nothing leaks through `push`.

Each test is one case: the input a careless or malicious folder gives, and the expected outcome.
"""
import json
import os
import pickle
import re
from pathlib import Path

import pytest

import open_clip
import open_clip_cxr

ROOT = Path(__file__).resolve().parents[1]


class _WritesMarker:
    """Unpickling this writes a file: the stand-in for code in a crafted checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- resume: a crafted custom_checkpoint_*.pkl --------------------------------------------------
def test_resume_refuses_a_pickle_that_runs_code(tmp_path):
    """input: a run folder whose checkpoint holds a code-running pickle -> refused, code not run."""
    from accelerate import Accelerator
    from open_clip_cxr_train.common import TrainState, UnsafeCheckpointError, resume_from_checkpoint, save_checkpoint
    acc = Accelerator(cpu=True)
    state = TrainState(step=3)
    acc.register_for_checkpointing(state)
    ckpt = save_checkpoint(acc, str(tmp_path), state)
    marker = tmp_path / "code-ran"
    with open(Path(ckpt) / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_WritesMarker(str(marker)), f)
    with pytest.raises(UnsafeCheckpointError, match="refusing to resume"):
        resume_from_checkpoint(acc, str(tmp_path), TrainState())
    assert not marker.exists()


def test_resume_of_an_honest_checkpoint_still_works(tmp_path):
    """input: a checkpoint our own save wrote -> resumes, counters restored."""
    from accelerate import Accelerator
    from open_clip_cxr_train.common import TrainState, resume_from_checkpoint, save_checkpoint
    acc = Accelerator(cpu=True)
    state = TrainState(step=7, samples_seen=56)
    acc.register_for_checkpointing(state)
    save_checkpoint(acc, str(tmp_path), state)
    state.step, state.samples_seen = 0, 0
    assert resume_from_checkpoint(acc, str(tmp_path), state)
    assert (state.step, state.samples_seen) == (7, 56)


def test_every_torch_load_passes_weights_only_true():
    """input: the project's source -> every torch.load call says weights_only=True explicitly."""
    calls = []
    for path in ROOT.glob("**/*.py"):
        if any(p in path.parts for p in (".venv", "tests", "build")):
            continue
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, text[m.start():i]))
    assert calls, "no torch.load found: the scan is broken"
    bad = [c for c in calls if "weights_only=True" not in c[1]]
    assert not bad, bad


# -- remote code: a folder with auto_map ---------------------------------------------------------
def _evil_folder(root: Path, marker: Path) -> Path:
    evil = root / "evil-tower"
    evil.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\n" \
           "from transformers import PretrainedConfig, PreTrainedModel\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n" \
           "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
    (evil / "evil.py").write_text(code)
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                                           "AutoTokenizer": ["evil.EvilConfig", None]}}))
    (evil / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilConfig", None]}}))
    return evil


@pytest.fixture
def answers_yes(monkeypatch):
    """transformers asks "run the custom code? [y/N]" on a terminal; answer "y" as a user might."""
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    monkeypatch.delenv("HF_HUB_TRUST_REMOTE_CODE", raising=False)
    return asked


def test_local_dir_pointing_at_custom_code_is_refused_without_prompt(tmp_path, answers_yes):
    """input: local-dir: folder whose text_cfg.hf_model_name has auto_map code -> error, no prompt, no code run."""
    marker = tmp_path / "code-ran"
    evil = _evil_folder(tmp_path, marker)
    cfg = open_clip.get_model_config("cxr-llm-tiny")
    cfg["text_cfg"]["hf_model_name"] = str(evil)
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    with pytest.raises(Exception):
        open_clip_cxr.create_model("local-dir:" + str(folder), pretrained=None)
    assert not marker.exists() and not answers_yes


def test_tokenizer_with_custom_code_is_refused_without_prompt(tmp_path, answers_yes):
    """input: a tokenizer folder with auto_map code (via OpenCLIP's HFTokenizer) -> error, no prompt, no code run."""
    marker = tmp_path / "code-ran"
    evil = _evil_folder(tmp_path, marker)
    with pytest.raises(Exception):
        open_clip.factory.HFTokenizer(str(evil))
    assert not marker.exists() and not answers_yes


# -- push: report text, PHI, repo ids ------------------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from open_clip_cxr_convert.export import export_folder
    from conversion_fixtures import tiny_clip
    from open_clip_cxr_hub.card import render_card
    model, tokenizer = tiny_clip(seed=1)
    cfg = open_clip.get_model_config("cxr-llm-tiny")
    folder = tmp_path_factory.mktemp("release") / "tiny"
    export_folder(model, cfg, tokenizer, folder, card=render_card(repo_id="org/tiny", model_cfg=cfg))
    return folder


def test_push_accepts_our_own_card(release):
    """input: a folder as export wrote it -> the leak check passes (dry run lists the files)."""
    from open_clip_cxr_hub.push import push_folder
    assert "README.md" in push_folder(release, "org/tiny", dry_run=True, validate=False)["files"]


@pytest.mark.parametrize("name,text", [
    ("README.md", "# model\n\nFINDINGS: Small left pleural effusion.\nIMPRESSION: effusion.\n"),
    ("README.md", "Example: Patient MRN: 00123456, no acute cardiopulmonary process.\n"),
    ("README.md", "The lungs are clear. No pleural effusion or pneumothorax.\n"),
    ("tokenizer_config.json", '{"note": "DOB: 1950-01-01"}'),
])
def test_push_refuses_report_text_or_phi(release, tmp_path, name, text):
    """input: a release folder edited after export to hold report text or PHI -> push refuses, names the file."""
    import shutil
    from open_clip_cxr_hub.push import LeakError, push_folder
    folder = tmp_path / "edited"
    shutil.copytree(release, folder)
    with open(folder / name, "a") as f:
        f.write(text)
    with pytest.raises(LeakError, match=re.escape(name)):
        push_folder(folder, "org/tiny", dry_run=True, validate=False)


@pytest.mark.parametrize("repo_id", ["me/", "me/x.git", "/x", "me", "a/b/c", "me/x y", "me/../x", "me/x--y"])
def test_push_refuses_repo_ids_that_are_not_org_name(release, repo_id):
    """input: --repo-id not of the form ORG/NAME -> refused before anything is read or sent."""
    from open_clip_cxr_hub.push import push_folder
    from open_clip_cxr.errors import UsageError
    with pytest.raises(UsageError, match="ORG/NAME"):
        push_folder(release, repo_id, dry_run=True, validate=False)
