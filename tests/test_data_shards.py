"""Shard writer: sources -> tar shards + manifest, bad inputs, resume, limits, CLI."""
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import data_fixtures as fx
from open_clip_cxr.data.encode import EncodeOptions
from open_clip_cxr.data.manifest import file_sha256, load_manifest, shard_urls
from open_clip_cxr.data.shard_writer import (ShardLimits, ShardWriterError, format_summary,
                                             write_shards)
from open_clip_cxr.data.sources import iter_source


def read_shards(out: Path):
    """{key: {ext: bytes}} over every shard in the folder, and the member order per shard."""
    samples = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def write(records, out, **kw):
    kw.setdefault("progress", False)
    return write_shards(records, out, **kw)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    return root, fx.make_mimic(root, n_studies=4, bad=True)


def test_mimic_round_trip_and_bad_inputs(mimic, tmp_path):
    root, expected = mimic
    m = write(iter_source("mimic-cxr", root=root), tmp_path, options=EncodeOptions(max_side=128),
              limits=ShardLimits(samples_per_shard=3))
    samples = read_shards(tmp_path)
    assert len(samples) == expected["samples"] == sum(s["samples"] for s in m["splits"].values())
    assert m["skipped"]["by_reason"] == expected["skipped"]
    assert {s["reason"] for s in m["skipped"]["samples"]} == set(expected["skipped"])
    good = samples["mimic-cxr_50000001_d001a"]
    meta = json.loads(good["json"])
    # official split csv (study 1 -> "train"), ViewPosition from metadata, labels from the chexpert table
    assert meta["split"] == "train" and meta["view"] == "PA" and meta["patient_id"] == "10000001"
    assert meta["study_id"] == "50000001" and meta["image_id"] == "d001a"
    assert meta["labels"] == {"Atelectasis": 1.0, "Cardiomegaly": 0.0}
    assert "right lower lobe" in meta["sections"]["findings"].lower()
    assert "pneumonia" in meta["sections"]["impression"].lower()
    assert "pneumonia" in good["txt"].decode().lower()
    img = Image.open(io.BytesIO(good["png"]))
    assert img.mode == "L" and max(img.size) == 128
    assert json.loads(samples["mimic-cxr_50000002_d002b"]["json"])["split"] == "validate"
    # shards are named per split, indexed from 0, and each is listed with its sha256
    for name, e in m["shards"].items():
        assert name.startswith(e["split"] + "-") and file_sha256(tmp_path / name) == e["sha256"]
        assert e["count"] <= 3
    assert not list(tmp_path.glob("*.tmp"))
    summary = format_summary(m, tmp_path)
    for reason in expected["skipped"]:
        assert reason in summary
    assert load_manifest(tmp_path)["complete"] is True


@pytest.mark.parametrize("packed", [False, True], ids=["xml-folder", "tgz"])
def test_openi_reports_with_pngs(tmp_path, packed):
    layout = fx.make_openi(tmp_path / "openi", n_reports=4)
    reports = layout["reports"]
    if packed:  # the NLMCXR_reports.tgz layout, built from our own XML
        reports = tmp_path / "reports.tgz"
        with tarfile.open(reports, "w:gz") as tar:
            tar.add(layout["reports"], arcname="ecgen-radiology")
    m = write(iter_source("openi", reports=reports, root=layout["images"]), tmp_path / "out",
              options=EncodeOptions(max_side=96, image_format="jpg", jpeg_quality=90))
    samples = read_shards(tmp_path / "out")
    assert len(samples) == layout["n_images"] and m["skipped"]["total"] == 0
    metas = [json.loads(s["json"]) for s in samples.values()]
    assert {m_["image_id"] for m_ in metas} == {f"CXR{i}_1_IM-{i:04d}-{k}001" for i in range(1, 5) for k in (1, 2)}
    # no official split: the two images of a study always land in the same hash split
    by_study = {}
    for meta in metas:
        by_study.setdefault(meta["study_id"], set()).add(meta["split"])
    assert len(by_study) == 4 and all(len(v) == 1 for v in by_study.values())
    assert all("jpg" in s and Image.open(io.BytesIO(s["jpg"])).format == "JPEG" for s in samples.values())


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_table_relative_paths_and_real_dicom(tmp_path, fmt):
    t = fx.make_table(tmp_path / "tbl", n=4, fmt=fmt)
    m = write(iter_source("table", table=t["table"], patient_col="patient"), tmp_path / "out",
              options=EncodeOptions(max_side=200))
    samples = read_shards(tmp_path / "out")
    assert len(samples) == 4 and m["skipped"]["total"] == 0
    dcm = next(s for s in samples.values() if json.loads(s["json"])["image_id"] == "adult_pa")
    img = Image.open(io.BytesIO(dcm["png"]))
    assert max(img.size) == 200 and 20 < sum(img.getdata()) / (img.size[0] * img.size[1]) < 235
    splits = {}
    for s in samples.values():
        meta = json.loads(s["json"])
        splits.setdefault(meta["patient_id"], set()).add(meta["split"])
    assert all(len(v) == 1 for v in splits.values())  # split by patient
    shares = {r.split for r in iter_source("table", table=t["table"], val=0.0, test=0.0)}
    assert shares == {"train"}  # --val-frac/--test-frac drive the hash split


def test_mimic_view_filter(mimic, tmp_path):
    root, _ = mimic
    write(iter_source("mimic-cxr", root=root, views=["pa"]), tmp_path, options=EncodeOptions(max_side=32))
    views = {json.loads(s["json"])["view"] for s in read_shards(tmp_path).values()}
    assert views == {"PA"}


def test_chexpert_plus_csv_with_png_release(tmp_path):
    rows = fx.make_chexpert_plus(tmp_path)
    m = write(iter_source("chexpert-plus", table=tmp_path / "df_chexpert_plus.csv", root=tmp_path),
              tmp_path / "out", options=EncodeOptions(max_side=32))
    metas = [json.loads(s["json"]) for s in read_shards(tmp_path / "out").values()]
    assert len(metas) == rows["images"] and m["skipped"]["by_reason"] == {"empty-report": 1}
    assert {x["split"] for x in metas} == {"train", "validate"}  # the csv's own split column
    assert {x["view"] for x in metas} == {"PA", "AP", "Lateral"}
    assert {x["study_id"] for x in metas} == {"train/patient00001/study1", "valid/patient00002/study1"}


def test_resume_after_interruption_is_byte_identical(mimic, tmp_path):
    root, _ = mimic
    opts, limits = EncodeOptions(max_side=64), ShardLimits(samples_per_shard=2)
    full = write(iter_source("mimic-cxr", root=root), tmp_path / "ref", options=opts, limits=limits)
    assert len(full["shards"]) >= 4

    class Stop(Exception):
        pass

    first_two = []

    def stop_after_two(name, entry):
        first_two.append(name)
        if len(first_two) == 2:
            raise Stop

    out = tmp_path / "run"
    with pytest.raises(Stop):
        write(iter_source("mimic-cxr", root=root), out, options=opts, limits=limits, on_shard_done=stop_after_two)
    assert len(list(out.glob("*.tar"))) == 2 and load_manifest(out)["complete"] is False
    (out / "stray-000009.tar.tmp").write_bytes(b"half a shard")
    again = write(iter_source("mimic-cxr", root=root), out, options=opts, limits=limits)
    assert again["run"]["reused"] == sorted(first_two)
    assert sorted(again["run"]["written"] + first_two) == sorted(full["shards"])
    assert not list(out.glob("*.tmp"))
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.tar")}
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == ref
    assert again["skipped"]["by_reason"] == full["skipped"]["by_reason"]

    # a deleted shard and a truncated one are redone, exactly, and nothing else is touched
    names = sorted(ref)
    (out / names[1]).unlink()
    (out / names[-1]).write_bytes(ref[names[-1]][:700])
    third = write(iter_source("mimic-cxr", root=root), out, options=opts, limits=limits)
    assert sorted(third["run"]["written"]) == sorted([names[1], names[-1]])
    assert len(third["run"]["reused"]) == len(names) - 2
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == ref


def test_bad_samples_at_the_end_widen_the_last_shard(tmp_path):
    from open_clip_cxr.data.shard_writer import plan_samples
    from open_clip_cxr.data.sources import Sample
    from open_clip_cxr.reports.types import Report
    records = []
    for i in range(5):
        report = Report(study_id=f"st{i}", source="hand", findings="Clear lungs.", impression="Normal.",
                        text="Clear lungs. Normal.")
        path = fx.tiny_image(tmp_path / "img" / f"{i}.png", value=40 * i)
        records.append(Sample("hand", report.study_id, f"im{i}", str(path), report, "train"))
    order, _ = plan_samples(records)
    for s in order["train"][-2:]:  # the last two in shard order lose their image
        Path(s.image_path).unlink()
    m = write(records, tmp_path / "out", limits=ShardLimits(samples_per_shard=3))
    entries = sorted(m["shards"].values(), key=lambda e: e["index"])
    assert [e["count"] for e in entries] == [3] and entries[-1]["end"] == 5
    assert [s["reason"] for s in entries[-1]["skipped"]] == ["missing-file"] * 2
    again = write(records, tmp_path / "out", limits=ShardLimits(samples_per_shard=3))
    assert again["run"]["written"] == [] and again["run"]["processed"] == 0


def test_no_samples_is_an_error(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("image,report\nmissing.png,\n", encoding="utf-8")
    with pytest.raises(ShardWriterError, match="no usable samples"):
        write(iter_source("table", table=t), tmp_path / "out")


def test_two_workers_write_the_same_bytes(mimic, tmp_path):
    root, _ = mimic
    opts, limits = EncodeOptions(max_side=64), ShardLimits(samples_per_shard=4)
    one = write(iter_source("mimic-cxr", root=root), tmp_path / "w1", options=opts, limits=limits, workers=1)
    two = write(iter_source("mimic-cxr", root=root), tmp_path / "w2", options=opts, limits=limits, workers=2)
    assert {n: e["sha256"] for n, e in one["shards"].items()} == {n: e["sha256"] for n, e in two["shards"].items()}
    assert one["skipped"]["by_reason"] == two["skipped"]["by_reason"]


def test_byte_limit_cuts_shards(tmp_path):
    t = fx.make_table(tmp_path / "tbl", n=5)
    m = write(iter_source("table", table=t["table"]), tmp_path / "out", options=EncodeOptions(max_side=256),
              limits=ShardLimits(samples_per_shard=100, max_shard_bytes=120_000))
    assert len(m["shards"]) >= 2
    for name, e in m["shards"].items():
        assert e["bytes"] == (tmp_path / "out" / name).stat().st_size
        assert e["count"] == 1 or e["bytes"] <= 120_000  # a single big sample may exceed the limit alone
    assert sum(e["count"] for e in m["shards"].values()) == 5


def test_other_options_refused_unless_overwrite(tmp_path):
    t = fx.make_table(tmp_path / "tbl", n=3)
    write(iter_source("table", table=t["table"]), tmp_path / "out", options=EncodeOptions(max_side=64))
    with pytest.raises(ShardWriterError):
        write(iter_source("table", table=t["table"]), tmp_path / "out", options=EncodeOptions(max_side=32))
    m = write(iter_source("table", table=t["table"]), tmp_path / "out", options=EncodeOptions(max_side=32),
              overwrite=True)
    assert all(max(Image.open(io.BytesIO(s["png"])).size) <= 32 for s in read_shards(tmp_path / "out").values())
    assert sum(s["samples"] for s in m["splits"].values()) == 3


def test_variants_stored_in_json(tmp_path):
    t = fx.make_table(tmp_path / "tbl", n=2)
    write(iter_source("table", table=t["table"]), tmp_path / "out",
          options=EncodeOptions(max_side=32, variants=True, seed=3))
    for s in read_shards(tmp_path / "out").values():
        variants = json.loads(s["json"])["variants"]
        assert variants and all(set(v) == {"text", "style", "equivalent", "error_type"} for v in variants)


def test_cli_writes_shards_and_prints_summary(tmp_path, capsys):
    from open_clip_cxr.cli import build_parser, main
    t = fx.make_table(tmp_path / "tbl", n=3)
    out = tmp_path / "out"
    rc = main(["shards", "--source", "table", "--table", str(t["table"]), "--patient-col", "patient",
               "--out", str(out), "--max-side", "48", "--format", "jpg", "--samples-per-shard", "2",
               "--max-shard-bytes", "10M", "--workers", "1", "--limit", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "skipped nothing" in printed and "samples" in printed
    assert sum(len(shard_urls(out, s)) for s in load_manifest(out)["splits"]) >= 1
    assert len(read_shards(out)) == 2
    help_text = build_parser(load="shards")._subparsers._group_actions[0].choices["shards"].format_help()
    for flag in ("--source", "--max-side", "--max-shard-bytes", "--variants", "--limit", "mimic-cxr"):
        assert flag in help_text
