"""One report source: a dataset registered with one reader is seen by `shards`, stage 1's
`load_reports` and the text-robustness eval's reader, with the one split rule."""
import json

import pytest

from data_fixtures import REPORTS, jpeg_paths, small_copy
from open_clip_cxr.data import registry
from open_clip_cxr.reports.splits import assign_split, hash_split, report_split
from open_clip_cxr.reports.types import Report


@pytest.fixture
def toy_source(tmp_path):
    """A dataset layout none of the built-in readers knows: `studies.json` of {id, patient, text, image}."""
    images = [small_copy(p, tmp_path / "img" / f"{i}.jpg", side=64) for i, p in enumerate(jpeg_paths()[:6])]
    rows = [{"id": f"toy{i}", "patient": f"pt{i // 2}", "text": f"FINDINGS: {f}\nIMPRESSION: {imp}",
             "image": str(images[i])} for i, (f, imp) in enumerate(REPORTS)]
    (tmp_path / "studies.json").write_text(json.dumps(rows))

    def read_toy(table=None, **_):
        """`--table`: a toy studies.json."""
        from open_clip_cxr.reports.parsers import read_mimic_txt
        for row in json.loads(open(table).read()):
            r = read_mimic_txt(row["text"], study_id=row["id"], patient_id=row["patient"])
            r.source, r.images = "toy", [{"path": row["image"]}]
            yield r
    registry.register_source("toy", path_arg="table")(read_toy)
    yield tmp_path / "studies.json"
    registry._SOURCES.pop("toy", None)


def test_the_split_rule():
    assert assign_split("Valid", "p1", "s1") == "validate" and assign_split(" TRAINING ", None, "s") == "train"
    assert assign_split(None, "p1", "s1") == hash_split("p1") and assign_split(None, None, "s1") == hash_split("s1")
    assert assign_split("", "p1", "s1", val=0.0, test=1.0) == "test"
    assert report_split(Report("s9", "x", patient_id="p9")) == hash_split("p9")


def test_a_registered_source_reaches_shards_stage1_and_eval(toy_source, tmp_path):
    from open_clip_cxr.cli import main
    from open_clip_cxr.data.manifest import load_manifest
    from open_clip_cxr.eval.robustness import load_reports as eval_reports
    from open_clip_cxr_train.text_stage import load_reports as stage1_reports
    assert "toy" in registry.sources()
    expected = {f"toy{i}": hash_split(f"pt{i // 2}") for i in range(len(REPORTS))}

    # shards: the CLI offers it and writes one sample per study, split by patient
    samples = list(registry.iter_source("toy", table=str(toy_source)))
    assert {s.study_id: s.split for s in samples} == expected
    out = tmp_path / "shards"
    assert main(["shards", "--source", "toy", "--table", str(toy_source), "--out", str(out), "--workers", "1",
                 "--no-progress", "--max-side", "64"]) == 0
    manifest = load_manifest(out)
    assert sum(e["count"] for e in manifest["shards"].values()) == len(REPORTS)

    # stage 1 and eval: the same studies, the same split
    for split in ("train", "validate", "test"):
        want = sorted(k for k, v in expected.items() if v == split)
        assert sorted(r.study_id for r in stage1_reports({"source": "toy", "path": str(toy_source)}, split)) == want
        assert sorted(r.study_id for r in eval_reports({"source": "toy", "path": str(toy_source)}, split)) == want
    # and the shards written from it read back as reports with the split they were written with
    back = stage1_reports({"shards": str(out / "*.tar")}, None)
    assert {r.study_id: r.split for r in back} == expected


def test_unknown_source_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown source 'nope'.*openi.*table"):
        list(registry.iter_reports({"source": "nope"}))
    with pytest.raises(ValueError, match="holds no images"):
        registry.iter_source("shards")


def test_a_stage1_recipe_may_name_any_registered_source(toy_source):
    """The typed recipe reads its `data.source` choices from the registry: a new reader is a
    valid stage-1 source at once; an unknown name is refused naming the registered ones."""
    from open_clip_cxr.errors import UsageError
    from open_clip_cxr_train.recipe_check import resolve_recipe
    assert resolve_recipe({"data": {"source": "toy"}}, "text")["data"]["source"] == "toy"
    with pytest.raises(UsageError, match=r"data.source.*'toyz'.*openi.*toy"):
        resolve_recipe({"data": {"source": "toyz"}}, "text")
