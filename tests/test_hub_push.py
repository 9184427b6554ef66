"""`open-clip-cxr push`: validation, dry run, the single commit, and loading the uploaded files
back through `hf-hub:` from a Hugging Face cache (offline)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import open_clip
from open_clip_cxr_convert.export import embeddings, export_folder
from conversion_fixtures import tiny_clip
from open_clip_cxr_hub.card import render_card
from open_clip_cxr_hub.push import push_folder, upload_plan
from open_clip_cxr.cli import main as cli_main

REPO = "org/cxr-llm-tiny"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An exported (merged) tiny model folder with its card, and the source's reference embeddings."""
    model, tokenizer = tiny_clip(seed=4)
    reference = embeddings(model, tokenizer)
    cfg = open_clip.get_model_config("cxr-llm-tiny")
    folder = tmp_path_factory.mktemp("release") / "cxr-llm-tiny"
    export_folder(model, cfg, tokenizer, folder, card=render_card(repo_id=REPO, model_cfg=cfg))
    return folder, reference


class FakeApi:
    """Records calls; the 'Hub' head moves only when a commit changes something."""

    def __init__(self):
        self.calls, self.head, self.files = [], None, {}

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def repo_info(self, repo_id, revision=None):
        if self.head is None:
            raise RuntimeError("no commits yet")
        return type("Info", (), {"sha": self.head})()

    def create_commit(self, repo_id, operations, **kw):
        ops = list(operations)
        self.calls.append(("create_commit", repo_id, [op.path_in_repo for op in ops], kw))
        new = {op.path_in_repo: op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
               else Path(op.path_or_fileobj).read_bytes() for op in ops}
        if new != self.files:  # huggingface_hub skips empty commits and returns the current head
            self.files, self.head = new, f"{len(self.calls):040x}"
        url = f"https://huggingface.co/{repo_id}/commit/{self.head}"
        return type("CommitInfo", (), {"oid": self.head, "commit_url": url})()


def test_dry_run_validates_and_lists_without_network(release, monkeypatch, capsys):
    folder, _ = release
    (folder / "reports.csv").write_text("id,report\n1,redacted\n")  # must never be uploaded
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("dry run touched the Hub"))
    result = push_folder(folder, REPO, dry_run=True)
    assert result["dry_run"] and result["embed_dim"] == 32
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md", "tokenizer.json"} <= set(result["files"])
    assert result["skipped"] == ["reports.csv"]
    assert cli_main(["push", "--repo-id", REPO, "--folder", str(folder), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "reports.csv" in out and f"https://huggingface.co/{REPO}" in out
    (folder / "reports.csv").unlink()


def test_push_is_one_commit_with_the_repo_as_tokenizer(release):
    folder, _ = release
    api = FakeApi()
    first = push_folder(folder, REPO, private=True, api=api, validate=False)
    kinds = [c[0] for c in api.calls]
    assert kinds == ["create_repo", "create_commit"]
    assert api.calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    config = json.loads(api.files["open_clip_config.json"])
    assert config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == REPO
    assert not first["noop"] and first["commit"] == api.head
    again = push_folder(folder, REPO, api=api, validate=False)  # re-pushing the same folder: no new commit
    assert again["noop"] and again["commit"] == first["commit"]
    branch = push_folder(folder, REPO, revision="v1", api=FakeApi(), validate=False)
    assert branch["url"].endswith("/tree/v1")


def test_missing_files_and_bad_repo_ids(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        upload_plan(tmp_path, REPO)
    with pytest.raises(ValueError, match="ORG/NAME"):
        push_folder(tmp_path, "no-slash", dry_run=True)


LOADER = textwrap.dedent("""
    import sys, torch
    import open_clip, open_clip_cxr
    from open_clip_cxr_convert.export import embeddings
    name = "hf-hub:" + sys.argv[1]
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    out = embeddings(model, tokenizer)
    torch.save({k: out[k] for k in ("tokens", "text", "image")}, sys.argv[2])
    print("resize_mode", model.visual.preprocess_cfg.get("resize_mode"))
""")


def hf_cache(tmp_path, folder) -> Path:
    """The files `push` would upload, laid out as a Hugging Face cache: HF_HOME/hub/models--ORG--NAME/..."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    files, _ = upload_plan(folder, REPO)
    for f in files:
        (snapshot / f.path_in_repo).write_bytes(f.source if isinstance(f.source, bytes) else f.source.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return tmp_path / "hf"


def assert_matches(got, reference):
    assert torch.equal(got["tokens"], reference["tokens"])
    assert torch.allclose(got["text"], reference["text"], atol=1e-5)
    assert torch.allclose(got["image"], reference["image"], atol=1e-5)


@torch.no_grad()
def test_hf_hub_loading_from_a_local_cache(release, tmp_path, monkeypatch):
    """In this process: huggingface_hub and transformers read the cache location and offline flag
    from `huggingface_hub.constants` at call time, so patching those two is enough."""
    import huggingface_hub.constants as hub_constants
    folder, reference = release
    home = hf_cache(tmp_path, folder)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    name = "hf-hub:" + REPO
    model, _, _ = open_clip.create_model_and_transforms(name)
    assert model.visual.preprocess_cfg["resize_mode"] == "longest"  # our CXR preprocessing came with the config
    assert_matches(embeddings(model, open_clip.get_tokenizer(name)), reference)


@pytest.mark.slow
def test_hf_hub_loading_in_a_fresh_process(release, tmp_path):
    """End to end with only environment variables (HF_HOME, HF_HUB_OFFLINE), as a user would."""
    folder, reference = release
    home = hf_cache(tmp_path, folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", LOADER, REPO, str(tmp_path / "out.pt")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resize_mode longest" in proc.stdout
    assert_matches(torch.load(tmp_path / "out.pt", weights_only=True), reference)
