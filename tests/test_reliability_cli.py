"""Catalogue: one error model for the CLI.

A user's mistake -> one line on stderr naming the problem and the fix, exit 2; a bug keeps its
traceback; `--help` of every subcommand is fast (no torch import before parsing).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from open_clip_cxr.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv, *needles):
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith(f"open-clip-cxr {argv[0]}: error: "), last
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.mark.parametrize("command", ["shards", "eval", "export", "push", "convert"])
def test_help_does_not_import_torch(command):
    """input: `open-clip-cxr COMMAND --help` -> help text without importing torch (what makes it fast;
    the time itself is measured by bench/bench_cli_help.py, not asserted here)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = "import sys, runpy; sys.argv = ['open-clip-cxr', %r, '--help']\n" \
            "try:\n    runpy.run_module('open_clip_cxr.cli', run_name='__main__', alter_sys=True)\n" \
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)" % command
    out = subprocess.run([sys.executable, "-m", "open_clip_cxr.cli", command, "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout
    imported = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert imported.stdout.strip().splitlines()[-1] == "False", imported.stdout + imported.stderr


def test_unknown_model_lists_ours_first(capsys, tmp_path):
    """input: eval --model cxr-llm-nope -> exit 2, one line naming our models, not OpenCLIP's hundreds."""
    shards = tmp_path / "s.tar"
    import tarfile
    with tarfile.open(shards, "w"):
        pass
    line = _one_line_error(capsys, ["eval", "--model", "cxr-llm-nope", "--shards", str(shards), "--out", str(tmp_path / "o")],
                           "cxr-llm-nope", "ours: cxr-llm, cxr-llm-small")
    assert "ViT-B-32" not in line


def test_missing_local_dir(capsys, tmp_path):
    """input: export --model local-dir:<missing> -> exit 2, says the folder does not exist."""
    _one_line_error(capsys, ["export", "--model", f"local-dir:{tmp_path / 'nope'}", "--out", str(tmp_path / "o")],
                    "does not exist", "open-clip-cxr export")


def test_shards_out_is_a_file(capsys, tmp_path):
    """input: shards --out <an existing file> -> exit 2, says it is a file."""
    table = tmp_path / "t.csv"
    table.write_text("image,report\na.png,No effusion.\n")
    out = tmp_path / "file"
    out.write_text("x")
    _one_line_error(capsys, ["shards", "--source", "table", "--table", str(table), "--out", str(out)], "is a file")


def test_convert_missing_src(capsys, tmp_path):
    """input: convert --src <missing> -> exit 2, names --src."""
    _one_line_error(capsys, ["convert", "--from", "llm2vec", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                    "--src")


def test_push_missing_folder(capsys, tmp_path):
    """input: push --folder <missing> -> exit 2, says how to make one."""
    _one_line_error(capsys, ["push", "--repo-id", "org/x", "--folder", str(tmp_path / "nope"), "--dry-run"],
                    "export")


def test_offline_hub_id(capsys, tmp_path, monkeypatch):
    """input: eval --model hf-hub:org/not-cached with HF_HUB_OFFLINE=1 -> exit 2, says what to do offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    shards = tmp_path / "s.tar"
    import tarfile
    with tarfile.open(shards, "w"):
        pass
    _one_line_error(capsys, ["eval", "--model", "hf-hub:org/not-cached-anywhere", "--shards", str(shards),
                             "--out", str(tmp_path / "o"), "--allow-partial"], "HF_HUB_OFFLINE", "local-dir:")


def test_eval_needs_shards(capsys, tmp_path):
    """input: eval without --shards -> exit 2 (not 1), one line."""
    _one_line_error(capsys, ["eval", "--model", "cxr-llm-tiny", "--out", str(tmp_path / "o")], "--shards")


def test_internal_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """input: a bug inside a subcommand (here: a KeyError) -> the exception propagates (traceback)."""
    import open_clip_cxr_convert.cli

    def boom(args):
        raise KeyError("a bug")
    monkeypatch.setattr(open_clip_cxr_convert.cli, "run", boom)
    with pytest.raises(KeyError):
        cli_main(["convert", "--from", "llm2vec", "--src", str(tmp_path), "--out", str(tmp_path / "o")])
