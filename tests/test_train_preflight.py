"""training/preflight.py: a stage refuses shards it cannot train on, before any work.

Before this check `train-clip` spun forever printing warnings on a pattern that matched no
file, and hung on an empty shard. Each refusal: exit 2, one line on stderr, no run folder.
`setup_accelerator` is a trap here, so a refusal that does not happen fails at once.
"""
from pathlib import Path

import pytest

from open_clip_cxr.cli import main
from open_clip_cxr_train import common
from train_trap_fixtures import WorkStarted, refused as _refused, trap_work, write_tar  # noqa: F401 (trap_work: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "training" / "recipes"



def run_clip(tmp_path, train, *sets):
    argv = ["train-clip", "--recipe", str(RECIPES / "clip-cxr-llm-small-cpu.yaml"), "--set", f"data.train={train}",
            "--output-dir", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    return main(argv)


def refused(capsys, tmp_path, rc, command, *needles):
    return _refused(capsys, tmp_path, rc, command, *needles, start='')


def test_pattern_matching_no_file(tmp_path, capsys):
    rc = run_clip(tmp_path, tmp_path / "nowhere" / "train-*.tar")
    refused(capsys, tmp_path, rc, "train-clip", "`data.train`", "pattern matches no file", "--set data.train=")


def test_brace_pattern_naming_a_missing_file(tmp_path, capsys):
    write_tar(tmp_path / "s" / "train-000000.tar", 3)
    rc = run_clip(tmp_path, tmp_path / "s" / "train-{000000..000001}.tar")
    refused(capsys, tmp_path, rc, "train-clip", "train-000001.tar", "missing")


def test_shards_holding_no_sample(tmp_path, capsys):
    rc = run_clip(tmp_path, write_tar(tmp_path / "s" / "train-000000.tar", 0))
    refused(capsys, tmp_path, rc, "train-clip", "`data.train`", "hold no sample")


def test_truncated_shard(tmp_path, capsys):
    path = Path(write_tar(tmp_path / "s" / "train-000000.tar", 50))
    path.write_bytes(path.read_bytes()[:3000])
    rc = run_clip(tmp_path, path)
    refused(capsys, tmp_path, rc, "train-clip", "`data.train`", "train-000000.tar")


def test_missing_validation_shards_are_refused_up_front(tmp_path, capsys):
    train = write_tar(tmp_path / "s" / "train-000000.tar", 3)
    rc = run_clip(tmp_path, train, f"data.val={tmp_path / 's' / 'validate-000000.tar'}")
    refused(capsys, tmp_path, rc, "train-clip", "`data.val`", "validate-000000.tar", "missing")


def test_no_training_shards_named(tmp_path):
    from open_clip_cxr.errors import UsageError
    from open_clip_cxr_train.clip_stage import train
    with pytest.raises(UsageError, match="names no training shards"):
        train({"output_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


def test_good_shards_reach_the_work(tmp_path):
    train = write_tar(tmp_path / "s" / "train-000000.tar", 3)
    val = write_tar(tmp_path / "s" / "validate-000000.tar", 2)
    with pytest.raises(WorkStarted):
        run_clip(tmp_path, train, f"data.val={val}")


def test_train_text_refuses_missing_report_shards(tmp_path, capsys):
    rc = main(["train-text", "--output-dir", str(tmp_path / "run"), "--set", f"data.shards={tmp_path / 'none-*.tar'}"])
    refused(capsys, tmp_path, rc, "train-text", "`data.shards`", "pattern matches no file")


def test_train_text_refuses_empty_report_shards(tmp_path, capsys):
    rc = main(["train-text", "--output-dir", str(tmp_path / "run"),
               "--set", f"data.shards={write_tar(tmp_path / 's' / 'train-000000.tar', 0)}"])
    refused(capsys, tmp_path, rc, "train-text", "`data.shards`", "hold no sample")


def test_log_with_null_writes_no_tensorboard_events(tmp_path, monkeypatch):
    """`train.log_with: null` -> an Accelerator without trackers (so no events file can appear)."""
    from open_clip_cxr_train import clip_stage
    monkeypatch.undo()                      # the real setup_accelerator
    common.reset_accelerator_state()
    try:
        for log_with, trackers in ((None, 0), ("none", 0), ("tensorboard", 1)):
            acc = clip_stage.setup_accelerator({"output_dir": str(tmp_path / "run"),
                                                "train": {"cpu": True, "log_with": log_with}})
            common.init_tracking(acc, {"train": {"log_with": log_with}}, "t")
            assert len(acc.trackers) == trackers, log_with
            acc.end_training()
            common.reset_accelerator_state()
            if not trackers:
                assert not list(tmp_path.rglob("events.out.tfevents*"))
        assert list(tmp_path.rglob("events.out.tfevents*"))   # the positive control wrote one
    finally:
        common.reset_accelerator_state()
