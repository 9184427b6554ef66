"""A table source's label columns, read into each image's labels and through to the shards."""
import csv
import json
import tarfile

import pytest

import data_fixtures as fx
from open_clip_cxr.data import table_labels as TL


def _table(tmp_path, fmt="csv"):
    t = fx.make_table(tmp_path / "tbl", n=3, fmt=fmt)
    values = [("1", "0"), ("0", "-1"), ("yes", "")]
    rows = [dict(r, Nodule=a, **{"Pleural Effusion": b}) for r, (a, b) in zip(t["rows"], values)]
    path = t["table"]
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_read_table_labels(tmp_path, fmt):
    path, rows = _table(tmp_path, fmt)
    by_image = TL.read_table_labels(path, ["Nodule", "pleural effusion"])   # any case
    first = by_image[str(path.parent.resolve() / rows[0]["image"])]
    assert first == {"Nodule": 1.0, "pleural effusion": 0.0}
    assert by_image[str(path.parent.resolve() / rows[1]["image"])] == {"Nodule": 0.0, "pleural effusion": -1.0}
    assert by_image[str(path.parent.resolve() / rows[2]["image"])] == {"Nodule": 1.0}   # empty cell: no label
    with pytest.raises(ValueError, match="no column 'Fibrosis'.*its columns are"):
        TL.read_table_labels(path, ["Nodule", "Fibrosis"])


def test_label_values():
    assert [TL.label_value(v) for v in ("1", "0.0", "-1", "True", "negative", "", None, "maybe", "nan")] == \
        [1.0, 0.0, -1.0, 1.0, 0.0, None, None, None, None]


def test_shards_cli_stores_table_labels(tmp_path, capsys):
    from open_clip_cxr.cli import main
    path, rows = _table(tmp_path)
    out = tmp_path / "out"
    assert main(["shards", "--source", "table", "--table", str(path), "--label-cols", "Nodule", "Pleural Effusion",
                 "--out", str(out), "--max-side", "32", "--workers", "1", "--no-progress", "--val-frac", "0",
                 "--test-frac", "0"]) == 0
    metas = []
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as tf:
            metas += [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 3
    assert sorted(json.dumps(m["labels"], sort_keys=True) for m in metas) == sorted(
        ['{"Nodule": 1.0, "Pleural Effusion": 0.0}', '{"Nodule": 0.0, "Pleural Effusion": -1.0}', '{"Nodule": 1.0}'])
    assert TL.label_names(metas)[:1] in (["Nodule"], ["Pleural Effusion"])
    rc = main(["shards", "--source", "table", "--table", str(path), "--label-cols", "Fibrosis",
               "--out", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "no column 'Fibrosis'" in capsys.readouterr().err
