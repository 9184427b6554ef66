"""`open-clip-cxr eval --task`: tasks register by name; a new one is one decorated function."""
import argparse
import json

import pytest

from open_clip_cxr.eval import cli


def test_builtin_tasks_and_what_they_need():
    assert list(cli.TASKS)[:4] == ["retrieval", "zeroshot", "report-gen", "text-robustness"]
    assert cli.TASKS["retrieval"].needs == ("model", "shards") and cli.TASKS["text-robustness"].needs == ()


def test_a_registered_task_runs_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.TASKS, "count-args", cli.TASKS["retrieval"])   # placeholder, replaced below
    seen = {}

    def count_args(args, model, preprocess, tokenizer):
        seen["called"] = (model, preprocess, tokenizer)
        return {"metrics": {"answer": 42}}
    cli.register_task("count-args", needs=())(count_args)
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--task", "count-args", "--out", str(tmp_path)])
    assert cli.run(args) == 0
    assert seen["called"] == (None, None, None)
    assert json.load(open(tmp_path / "results.json"))["results"]["metrics"]["answer"] == 42
    assert '"answer": 42' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs --model, --shards"):
        cli.run(p.parse_args(["--task", "retrieval", "--out", str(tmp_path)]))
