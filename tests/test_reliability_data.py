"""Catalogue: nothing is silently dropped, nothing leaks across splits, nothing is overwritten.

shards: a wrong --root, an empty split, conventional column names, duplicate rows, skip reasons;
eval: missing / truncated / mismatched shards, --allow-partial, glob patterns, skipped samples;
export: a foreign --out folder, the run's own recipe.yaml.
"""
import csv
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from data_fixtures import jpeg_paths, small_copy
from open_clip_cxr.cli import main as cli_main


def _table(tmp_path, rows, header=("image", "report"), name="t.csv"):
    path = tmp_path / name
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    return [small_copy(p, root / f"{i}.png", side=64) for i, p in enumerate(jpeg_paths()[:6])]


def _shards(argv, out):
    return cli_main(["shards", "--source", "table", "--out", str(out), "--workers", "1", "--no-progress", *argv])


def _manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


# -- shards ---------------------------------------------------------------------------------------
def test_wrong_root_fails_and_writes_no_empty_shard(tmp_path, images, capsys):
    """input: table of relative paths + a wrong --root -> exit 2, skip reasons in the message, no tar, manifest incomplete."""
    table = _table(tmp_path, [[p.name, "No pleural effusion."] for p in images])
    out = tmp_path / "out"
    rc = _shards(["--table", str(table), "--root", str(tmp_path)], out)
    err = capsys.readouterr().err
    assert rc == 2 and "wrote no sample" in err and "missing-file: 6" in err
    assert not list(out.glob("*.tar")) and _manifest(out)["complete"] is False


def test_empty_split_gets_no_shard(tmp_path, images, capsys):
    """input: every test-split row has a missing image -> no test-000000.tar; its skips still counted."""
    rows = [[str(p), "No effusion.", "train"] for p in images[:3]] + [["/nope/x.png", "No effusion.", "test"]]
    table = _table(tmp_path, rows, header=("image", "report", "split"))
    out = tmp_path / "out"
    assert _shards(["--table", str(table)], out) == 0
    assert not (out / "test-000000.tar").exists() and (out / "train-000000.tar").exists()
    m = _manifest(out)
    assert m["skipped"]["by_reason"] == {"missing-file": 1} and "test" not in m["splits"]


def test_conventional_columns_are_used_and_printed(tmp_path, images, capsys):
    """input: columns Image, Report, Study_ID, Patient, SPLIT (no flags) -> split from the table, studies grouped."""
    rows = [[str(images[0]), "No effusion.", "s1", "p1", "test"], [str(images[1]), "No effusion.", "s1", "p1", "test"],
            [str(images[2]), "Small effusion.", "s2", "p2", "train"]]
    table = _table(tmp_path, rows, header=("Image", "Report", "Study_ID", "Patient", "SPLIT"))
    out = tmp_path / "out"
    assert _shards(["--table", str(table)], out) == 0
    err = capsys.readouterr().err
    assert "study=Study_ID" in err and "patient=Patient" in err and "split=SPLIT" in err
    splits = _manifest(out)["splits"]
    assert splits["test"]["samples"] == 2 and splits["train"]["samples"] == 1


def test_flags_override_conventional_columns(tmp_path, images, capsys):
    """input: a `split` column and --split-col other -> the flag wins."""
    rows = [[str(images[0]), "No effusion.", "test", "train"]]
    table = _table(tmp_path, rows, header=("image", "report", "split", "other"))
    assert _shards(["--table", str(table), "--split-col", "other"], tmp_path / "out") == 0
    assert list(_manifest(tmp_path / "out")["splits"]) == ["train"]


def test_duplicate_identical_rows_are_counted(tmp_path, images, capsys):
    """input: the same row twice inside one study -> one sample written, one duplicate-row skip counted."""
    row = [str(images[0]), "No effusion.", "s1"]
    table = _table(tmp_path, [row, row, [str(images[1]), "No effusion.", "s1"]], header=("image", "report", "study_id"))
    assert _shards(["--table", str(table)], tmp_path / "out") == 0
    m = _manifest(tmp_path / "out")
    assert sum(s["samples"] for s in m["splits"].values()) == 2
    assert m["skipped"]["by_reason"] == {"duplicate-row": 1}


def test_skip_reasons_name_directories_and_carry_no_addresses(tmp_path, images, capsys):
    """input: a row naming a directory, one naming a non-image file -> not-a-file, unreadable-image without 0x..."""
    (tmp_path / "adir").mkdir()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    rows = [[str(images[0]), "No effusion."], [str(tmp_path / "adir"), "No effusion."], [str(bad), "No effusion."]]
    assert _shards(["--table", str(_table(tmp_path, rows))], tmp_path / "out") == 0
    m = _manifest(tmp_path / "out")
    assert m["skipped"]["by_reason"] == {"not-a-file": 1, "unreadable-image": 1}
    assert "0x" not in json.dumps(m["skipped"])


def test_table_without_image_or_report_column(tmp_path, capsys):
    """input: a CSV with columns path,text -> exit 2, names the missing column and the columns it has."""
    table = _table(tmp_path, [["a.png", "No effusion."]], header=("path", "text"))
    assert _shards(["--table", str(table)], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no column 'image'" in err and "path, text" in err


# -- eval: shard checks ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_shards(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("shards")
    rows = [[str(p), f"Report {i}. No effusion.", "test"] for i, p in enumerate(images)]
    table = _table(root, rows, header=("image", "report", "split"))
    assert _shards(["--table", str(table), "--samples-per-shard", "2"], root / "out") == 0
    return root / "out"


def _copy(test_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(test_shards, out)
    return out


def _eval(capsys, shards, tmp_path, *extra):
    rc = cli_main(["eval", "--model", "cxr-llm-tiny", "--shards", shards, "--out", str(tmp_path / "eval"),
                   "--batch-size", "4", *extra])
    return rc, capsys.readouterr().err


def test_eval_reads_a_glob_pattern(test_shards, tmp_path, capsys):
    """input: --shards 'DIR/test-*.tar' -> all 3 shards, all 6 images scored, 0 skipped."""
    rc, err = _eval(capsys, str(test_shards / "test-*.tar"), tmp_path)
    assert rc == 0, err
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["shard_check"]["shards"]["shards"] == 3 and res["results"]["skipped_samples"] == 0


@pytest.mark.parametrize("damage,needle", [
    ("missing", "missing"),
    ("truncate", "truncated"),
    ("rewrite", "sha256"),
])
def test_eval_refuses_damaged_shards(test_shards, tmp_path, capsys, damage, needle):
    """input: a missing / truncated / rewritten shard in the pattern -> exit 2 naming it and --allow-partial."""
    out = _copy(test_shards, tmp_path)
    target = out / "test-000001.tar"
    if damage == "missing":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1500])
    else:
        data = bytearray(target.read_bytes())
        data[600] ^= 0xFF  # one byte of a member's data: the tar still reads
        target.write_bytes(bytes(data))
    rc, err = _eval(capsys, str(out / "test-{000000..000002}.tar"), tmp_path)
    assert rc == 2 and "test-000001.tar" in err and needle in err and "--allow-partial" in err


def test_eval_refuses_a_truncated_tar_without_manifest(test_shards, tmp_path, capsys):
    """input: a truncated shard with no manifest.json beside it -> exit 2 (the tar itself is checked)."""
    out = _copy(test_shards, tmp_path)
    (out / "manifest.json").unlink()
    target = out / "test-000001.tar"
    target.write_bytes(target.read_bytes()[:1500])
    rc, err = _eval(capsys, str(out / "test-*.tar"), tmp_path)
    assert rc == 2 and "truncated" in err


def test_allow_partial_counts_what_is_left_out(test_shards, tmp_path, capsys):
    """input: one missing shard + --allow-partial -> exit 0, 4 images scored, the 2 lost samples counted."""
    out = _copy(test_shards, tmp_path)
    (out / "test-000001.tar").unlink()
    rc, err = _eval(capsys, str(out / "test-{000000..000002}.tar"), tmp_path, "--allow-partial")
    assert rc == 0, err
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    check = res["shard_check"]["shards"]
    assert check["lost_samples"] == 2 and len(check["problems"]) == 1
    assert res["results"]["n_images"] == 4


def test_skipped_samples_counts_samples_not_events(test_shards):
    """input: a shard whose tar breaks after its first sample -> skipped_samples = samples lost (1), not 1 event."""
    import torch
    from open_clip_cxr.eval.encode import skipped_samples

    class Reader:
        urls = [str(p) for p in sorted(test_shards.glob("test-*.tar"))]
        skipped = type("C", (), {"value": 1})()
    assert skipped_samples(Reader(), read=3, finished=True) == 3  # 6 in the manifests, 3 read
    assert skipped_samples(Reader(), read=3, finished=False) == 1  # stopped early (--limit): events only


# -- export ---------------------------------------------------------------------------------------
def test_export_refuses_a_folder_with_foreign_files(tmp_path, capsys):
    """input: export --out DIR where DIR holds notes.csv -> exit 2; with --overwrite -> written, notes.csv kept."""
    out = tmp_path / "release"
    out.mkdir()
    (out / "notes.csv").write_text("mine")
    rc = cli_main(["export", "--model", "cxr-llm-tiny", "--out", str(out), "--no-card"])
    assert rc == 2 and "notes.csv" in capsys.readouterr().err and not (out / "open_clip_config.json").exists()
    assert cli_main(["export", "--model", "cxr-llm-tiny", "--out", str(out), "--no-card", "--overwrite"]) == 0
    assert (out / "notes.csv").read_text() == "mine" and (out / "open_clip_config.json").exists()


def test_export_accepts_the_runs_own_recipe(tmp_path):
    """input: a saved recipe.yaml with an absolute output_dir and brace shard patterns -> the card renders."""
    import yaml
    from open_clip_cxr_hub.card import render_card
    root = Path(__file__).resolve().parents[1]
    recipe = yaml.safe_load((root / "training/recipes/clip-cxr-llm-small-cpu.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "runs" / "clip")
    recipe["data"]["train"] = "/data/shards/hospital/train-{000000..000009}.tar"
    recipe["data"]["val"] = "shards/hospital/validate-*.tar"
    card = render_card(repo_id="org/x", recipe=recipe)
    assert "org/x" in card
    from open_clip_cxr_hub.card import ReportTextError
    recipe["note"] = "No acute cardiopulmonary process."
    with pytest.raises(ReportTextError):
        render_card(repo_id="org/x", recipe=recipe)
