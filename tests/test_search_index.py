"""The search index: results equal a brute force, resume and --add equal a fresh build, refusals and errors.

Shards are written in the test from real package radiographs (tests/data_fixtures.py) with
hand-written reports; the model is the random `cxr-llm-tiny`.
"""
import copy
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import dicom_path, jpeg_paths
from search_fixtures import build, write_archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    a, b = write_archive(root, 0, 6), write_archive(root, 6, 2)
    pat = lambda d: "::".join(str(p) for p in sorted(d.glob("*.tar")))  # noqa: E731
    return {"root": root, "a": pat(a), "b": pat(b), "ab": pat(a) + "::" + pat(b)}


@pytest.fixture(scope="module")
def built(tiny, archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "index"
    build(tiny, out, archive["ab"])
    return out


def rows(folder):
    con = sqlite3.connect(folder / "meta.sqlite")
    out = {t: con.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in ("images", "studies")}
    con.close()
    return out


def faiss_vectors(folder, name):
    import faiss
    index = faiss.read_index(str(folder / name))
    return index.reconstruct_n(0, index.ntotal)


def assert_same_index(x, y):
    rx, ry = rows(x), rows(y)
    for t in rx:
        assert len(rx[t]) == len(ry[t]) > 0
        for a, b in zip(rx[t], ry[t]):
            assert a[:-1] == b[:-1]                      # ids, keys, studies, metadata, thumbnails
            np.testing.assert_allclose(np.frombuffer(a[-1], np.float32), np.frombuffer(b[-1], np.float32), atol=1e-6)
    for name in ("images.faiss", "reports.faiss"):
        np.testing.assert_allclose(faiss_vectors(x, name), faiss_vectors(y, name), atol=1e-6)


# ---------------------------------------------------------------- results equal a brute force

def test_search_equals_brute_force(tiny, archive, built):
    from open_clip_cxr.eval.encode import embed_shards, encode_texts
    from open_clip_cxr.search import Index
    model, preprocess, tokenizer = tiny
    ref = embed_shards(model, preprocess, tokenizer, archive["ab"], batch_size=5, progress=False)
    index = Index.open(built, model=tiny)
    assert index.manifest["counts"] == {"images": 8, "studies": 4, "skipped_unreadable": 0,
                                        "skipped_duplicate_keys": 0}
    queries = ["small left pleural effusion", "lungs are clear", "endotracheal tube above the carina"]
    q = encode_texts(model, tokenizer, queries)
    got = index.search_text(queries, k=3)
    for qi in range(len(queries)):
        scores = (q[qi:qi + 1] @ ref.image_emb.T)[0].numpy()
        best = {}
        for s, st in zip(scores, ref.image_study_ids):
            best[st] = max(best.get(st, -9), float(s))
        expect = sorted(best.items(), key=lambda kv: -kv[1])[:3]
        assert [r["study_id"] for r in got[qi]] == [s for s, _ in expect]
        np.testing.assert_allclose([r["score"] for r in got[qi]], [v for _, v in expect], atol=1e-5)
        assert [r["rank"] for r in got[qi]] == [1, 2, 3]
    # image -> reports: one report per study, as the evaluation embeds them
    img = jpeg_paths()[3]
    got = index.search_image([str(img)], k=4)[0]
    qv = torch.from_numpy(index.encode_image([str(img)]))
    order = torch.argsort((qv @ ref.text_emb.T)[0], descending=True).tolist()
    assert [r["study_id"] for r in got] == [ref.text_study_ids[i] for i in order]
    # records join back to the metadata
    r = got[0]
    assert r["findings"] in r["report"] and r["impression"] and r["patient_id"].startswith("p")
    assert r["split"] == "test" and r["n_images"] == 2 and r["snippet"]


def test_query_with_an_archived_film_flags_its_study(tiny, archive, built):
    from open_clip_cxr.search import Index
    index = Index.open(built, model=tiny)
    film = archive["root"] / "imgs" / "img5.png"          # study s2, written to the shards losslessly
    assert index.archived_study(index.encode_image([str(film)])) == ["s2"]
    got = index.search_image(str(film), k=4)               # a single image gives a single list
    assert [r["study_id"] for r in got if r["query_match"]] == ["s2"]


def test_approximate_kinds_find_the_exact_top_on_a_small_archive(tiny, built, tmp_path):
    import shutil
    from open_clip_cxr.search import Index, store
    exact = Index.open(built, model=tiny)
    q = exact.encode_text(["pleural effusion", "hyperinflated lungs"])
    want = [[r["study_id"] for r in res] for res in exact.search_text_vectors(q, 3)]
    for kind in ("hnsw", "ivf"):
        folder = tmp_path / kind
        folder.mkdir()
        shutil.copy(built / "meta.sqlite", folder)       # the rows are the same; only the FAISS files differ
        m = json.loads((built / "manifest.json").read_text())
        m["index"] = {"kind": kind, "params": {**store.DEFAULT_PARAMS[kind], "nlist": 2, "nprobe": 2}, "tables": {}}
        con = store.connect(folder)
        for table in store.FAISS_FILES:
            dim = len(m["model"]["probe"]["image"])
            index, m["index"]["tables"][table] = store.sync_faiss(folder, con, table, kind, m["index"]["params"], dim)
            assert index.ntotal == m["counts"][table] and index.is_trained
        con.close()
        store.write_manifest(folder, m)
        approx = Index.open(folder, model=tiny)
        assert [[r["study_id"] for r in res] for res in approx.search_text_vectors(q, 3)] == want


def test_two_threads_search_at_once_with_correct_results(tiny, built):
    import threading
    from open_clip_cxr.search import Index
    index = Index.open(built, model=tiny)
    qt = index.encode_text(["small left pleural effusion", "lungs are clear", "endotracheal tube"])
    qi = index.encode_image([str(p) for p in jpeg_paths()[:2]])
    want = (index.search_text_vectors(qt, 3), index.search_image_vectors(qi, 4))
    assert want[1][0][0]["study_id"] != want[1][1][0]["study_id"] or want[0][0] != want[0][1]   # not all alike
    barrier, got, errors = threading.Barrier(2), {0: [], 1: []}, []

    def worker(n):
        try:
            barrier.wait(timeout=30)
            for _ in range(15):
                got[n].append((index.search_text_vectors(qt, 3), index.search_image_vectors(qi, 4)))
        except Exception as exc:   # noqa: BLE001  (reported below)
            errors.append(exc)
    with index._lock:      # the query encoder's lock is held: searches must not wait for it
        threads = [threading.Thread(target=worker, args=(n,)) for n in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a search waited for the encoder lock"
    assert errors == []
    assert all(len(got[n]) == 15 and all(r == want for r in got[n]) for n in (0, 1))
    assert len(index._cons) == 3          # the main thread's and one per search thread
    index.close()


def test_several_queries_are_searched_in_one_faiss_call(tiny, built):
    from open_clip_cxr.search import Index
    index = Index.open(built, model=tiny)
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner, self.ntotal, self.d = inner, inner.ntotal, inner.d

        def search(self, q, k):
            calls.append(len(q))
            return self.inner.search(q, k)
    index.faiss = {t: Counting(ix) for t, ix in index.faiss.items()}
    texts = ["small left pleural effusion", "lungs are clear", "endotracheal tube"]
    assert len(index.search_text(texts, k=2)) == 3
    assert calls == [3]
    calls.clear()
    assert len(index.search_image([str(p) for p in jpeg_paths()[:3]], k=2)) == 3
    assert calls == [3, 3]                 # the reports, then the archived-film check


# ---------------------------------------------------------------- --store fp16 / int8

def embeddings(folder, table):
    con = sqlite3.connect(folder / "meta.sqlite")
    x = np.stack([np.frombuffer(r[0], np.float32) for r in con.execute(f"SELECT emb FROM {table} ORDER BY id")])
    studies = [r[0] for r in con.execute(f"SELECT study_id FROM {table} ORDER BY id")]
    con.close()
    return x, studies


def brute_force_studies(q, x, studies, k):
    """Top-k studies by their best row, with the scores, over the vectors x (float32 arithmetic)."""
    out = []
    for row in q @ x.T:
        best = {}
        for i in np.argsort(-row, kind="stable"):
            best.setdefault(studies[i], float(row[i]))
        out.append(list(best.items())[:k])
    return out


def test_fp16_store_equals_brute_force_over_fp16_rounded_vectors(tiny, archive, built, tmp_path):
    import faiss
    from open_clip_cxr.search import Index
    out = tmp_path / "fp16"
    m = build(tiny, out, archive["ab"], params={"store": "fp16"})
    assert m["index"]["params"]["store"] == "fp16"
    assert all(m["index"]["tables"][t]["store"] == "fp16" for t in ("images", "studies"))
    assert json.loads((out / "manifest.json").read_text())["index"]["params"]["store"] == "fp16"
    assert isinstance(faiss.read_index(str(out / "images.faiss")), faiss.IndexScalarQuantizer)
    assert json.loads((built / "manifest.json").read_text())["index"]["params"]["store"] == "fp32"
    index = Index.open(out, model=tiny)
    q = index.encode_text(["small left pleural effusion", "lungs are clear", "pleural effusion"])
    x, studies = embeddings(out, "images")
    x16 = x.astype(np.float16).astype(np.float32)           # the vectors FAISS keeps
    assert np.abs(x16 - x).max() > 0                          # rounding happened
    want = brute_force_studies(q, x16, studies, 3)
    got = index.search_text_vectors(q, 3)
    for g, w in zip(got, want):
        assert [r["study_id"] for r in g] == [s for s, _ in w]
        np.testing.assert_allclose([r["score"] for r in g], [v for _, v in w], atol=1e-5)
    xr, rstudies = embeddings(out, "studies")
    qi = index.encode_image([str(jpeg_paths()[2])])
    want = brute_force_studies(qi, xr.astype(np.float16).astype(np.float32), rstudies, 4)[0]
    assert [r["study_id"] for r in index.search_image_vectors(qi, 4)[0]] == [s for s, _ in want]


def test_int8_store_equals_brute_force_over_its_decoded_vectors(tiny, archive, built, tmp_path):
    import shutil
    from open_clip_cxr.search import Index, store
    folder = tmp_path / "int8"
    folder.mkdir()
    shutil.copy(built / "meta.sqlite", folder)
    m = json.loads((built / "manifest.json").read_text())
    m["index"] = {"kind": "flat", "params": {"store": "int8"}, "tables": {}}
    con = store.connect(folder)
    dim = len(m["model"]["probe"]["image"])
    for table in store.FAISS_FILES:
        _, m["index"]["tables"][table] = store.sync_faiss(folder, con, table, "flat", m["index"]["params"], dim)
    con.close()
    store.write_manifest(folder, m)
    index = Index.open(folder, model=tiny)
    assert index.faiss["images"].code_size == dim              # one byte per dimension
    film = index.encode_image([str(archive["root"] / "imgs" / "img5.png")])   # an archived film (study s2)
    inner = index.faiss["images"]

    class Lossy:     # a store whose scores are far off (as int8 can be at scale); the ids stay right
        ntotal, d = inner.ntotal, inner.d

        def search(self, q, k):
            scores, ids = inner.search(q, k)
            return scores * 0.9, ids
    index.faiss = {**index.faiss, "images": Lossy()}
    assert index.archived_study(film) == ["s2"]       # decided on the float32 embedding from SQLite
    index.faiss["images"] = inner
    x, studies = embeddings(folder, "images")
    decoded = index.faiss["images"].reconstruct_n(0, len(x))
    assert 0 < np.abs(decoded - x).max() < 0.05
    q = index.encode_text(["small left pleural effusion", "lungs are clear"])
    want = brute_force_studies(q, decoded, studies, 3)
    got = index.search_text_vectors(q, 3)
    for g, w in zip(got, want):
        assert [r["study_id"] for r in g] == [s for s, _ in w]
        np.testing.assert_allclose([r["score"] for r in g], [v for _, v in w], atol=1e-4)


def test_store_refusals(tiny, archive, built, tmp_path, capsys):
    from open_clip_cxr import cli
    from open_clip_cxr.search import SearchIndexError
    with pytest.raises(SearchIndexError, match=r"unknown --store 'fp64'; choose from fp32, fp16, int8"):
        build(tiny, tmp_path / "a", archive["a"], params={"store": "fp64"})
    with pytest.raises(SearchIndexError, match="--store fp16 does not apply to --index-kind ivfpq"):
        build(tiny, tmp_path / "b", archive["a"], kind="ivfpq", params={"store": "fp16"})
    with pytest.raises(SearchIndexError, match="stores fp32 vectors; --store int8 applies only to a new index"):
        build(tiny, built, archive["ab"], params={"store": "int8"})
    assert cli.main(["index", "--model", "cxr-llm-tiny", "--shards", archive["a"], "--store", "fp64",
                     "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("open-clip-cxr index: error: unknown --store 'fp64'") and "\n" not in err
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- resume and add

def test_interrupted_run_resumes_to_the_same_index(tiny, archive, built, tmp_path, monkeypatch):
    from open_clip_cxr.eval import encode
    from open_clip_cxr.search import Index, SearchIndexError
    out = tmp_path / "index"
    m = build(tiny, out, archive["ab"], max_chunks=3)
    assert not m["complete"] and m["counts"]["images"] == 5    # chunks of 2, 1 (end of a shard), 2
    with pytest.raises(SearchIndexError, match="incomplete"):
        Index.open(out)
    seen = []
    real = encode.encode_images
    monkeypatch.setattr(encode, "encode_images", lambda model, src, *a, **k: (seen.extend(s[0] for s in src),
                                                                                real(model, src, *a, **k))[1])
    m = build(tiny, out, archive["ab"])
    assert m["complete"] and len(seen) == 3                # only the images not committed before
    assert_same_index(out, built)
    seen.clear()
    build(tiny, out, archive["ab"])                        # a finished index: nothing encoded again
    assert seen == []


def test_add_equals_a_fresh_build_over_all_shards(tiny, archive, built, tmp_path):
    out = tmp_path / "index"
    build(tiny, out, archive["a"])
    before = rows(out)
    m = build(tiny, out, archive["b"], add=True)
    assert m["counts"]["images"] == 8
    assert rows(out)["images"][:6] == before["images"]     # old rows untouched
    assert_same_index(out, built)


def test_two_workers_give_the_same_index_as_one(tiny, archive, built, tmp_path, monkeypatch):
    import threading
    from open_clip_cxr.search import SearchIndexError, build as build_mod
    seen = set()
    real = build_mod._WithThumb.__call__

    def spy(self, img):
        seen.add(threading.current_thread().name)
        return real(self, img)
    monkeypatch.setattr(build_mod._WithThumb, "__call__", spy)
    build(tiny, tmp_path / "w2", archive["ab"], workers=2)
    assert seen and all(name.startswith("index-decode") for name in seen)     # decoded in the pool
    assert_same_index(tmp_path / "w2", built)                                  # built with 1 worker
    seen.clear()
    build(tiny, tmp_path / "w1", archive["a"], workers=1)
    assert seen == {threading.main_thread().name}
    with pytest.raises(SearchIndexError, match="--workers must be a positive whole number, got 0"):
        build(tiny, tmp_path / "w0", archive["a"], workers=0)


@pytest.mark.slow
def test_kill_inside_a_chunk_loses_only_that_chunk(tiny, archive, built, tmp_path, monkeypatch):
    from open_clip_cxr.eval import encode
    out = tmp_path / "index"
    calls = {"n": 0}
    real = encode.encode_texts

    def dies_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(encode, "encode_texts", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(tiny, out, archive["ab"])
    monkeypatch.setattr(encode, "encode_texts", real)
    assert rows(out)["images"] and len(rows(out)["images"]) < 8
    build(tiny, out, archive["ab"])
    assert_same_index(out, built)


# ---------------------------------------------------------------- refusals and errors

def test_another_model_or_preprocessing_is_refused_by_name(tiny, archive, built):
    import open_clip
    import open_clip_cxr
    from open_clip_cxr.search import Index, SearchIndexError
    with pytest.raises(SearchIndexError, match="'cxr-llm-tiny', not 'cxr-llm-small'"):
        Index.open(built, model_name="cxr-llm-small")
    torch.manual_seed(1)
    other, _, pre = open_clip_cxr.create_model_and_transforms("cxr-llm-tiny")
    with pytest.raises(SearchIndexError, match="other weights or preprocessing"):
        Index.open(built, model=(other.eval(), pre, tiny[2]))
    model = copy.deepcopy(tiny[0])
    open_clip.set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, "resize_mode": "squash"})
    with pytest.raises(SearchIndexError, match="preprocessing differs in resize_mode"):
        Index.open(built, model=(model, tiny[1], tiny[2]))
    with pytest.raises(SearchIndexError, match="built with model 'cxr-llm-tiny'"):
        build((other, pre, tiny[2]), built, archive["b"], add=True)


def test_folder_errors(tiny, archive, built, tmp_path):
    from open_clip_cxr.search import Index, SearchIndexError
    with pytest.raises(SearchIndexError, match="no index at"):
        Index.open(tmp_path / "nothing")
    newer = tmp_path / "newer"
    newer.mkdir()
    m = json.loads((built / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(SearchIndexError, match="newer open_clip_cxr"):
        Index.open(newer)
    with pytest.raises(SearchIndexError, match="already indexes other sources.*--add"):
        build(tiny, built, archive["b"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(SearchIndexError, match="not an index folder"):
        build(tiny, tmp_path / "busy", archive["a"])
    with pytest.raises(SearchIndexError, match="a 'flat' index"):
        build(tiny, built, archive["ab"], kind="hnsw")


def test_bad_queries(tiny, built, tmp_path):
    from open_clip_cxr.search import Index, SearchIndexError
    from open_clip_cxr.vision.io import ImageReadError
    index = Index.open(built, model=tiny)
    for bad in ("", "   ", []):
        with pytest.raises(SearchIndexError, match="query"):
            index.search_text(bad)
    with pytest.raises(SearchIndexError, match="k must be a positive integer"):
        index.search_text("effusion", k=0)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match="broken.png"):
        index.search_image(str(tmp_path / "broken.png"))
    with pytest.raises(SearchIndexError, match=r"\[n, "):
        index.search_text_vectors(np.zeros((1, 3), np.float32))


# ---------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(tiny[0].state_dict(), path)
    return path


def test_cli_index_a_table_then_search_text_and_dicom(tiny, archive, checkpoint, tmp_path, capsys):
    from open_clip_cxr import cli
    from open_clip_cxr.search import Index
    out = tmp_path / "index"
    assert cli.main(["index", "--model", "cxr-llm-tiny", "--pretrained", str(checkpoint), "--source", "table",
                     "--table", str(archive["root"] / "table6.csv"), "--study-col", "study", "--patient-col",
                     "patient", "--split-col", "split", "--out", str(out), "--no-progress"]) == 0
    con = sqlite3.connect(out / "meta.sqlite")
    paths = [r[0] for r in con.execute("SELECT image_path FROM images ORDER BY id")]
    assert len(paths) == 2 and all(Path(p).exists() for p in paths)        # original files, not shard members
    assert con.execute("SELECT COUNT(*) FROM studies WHERE patient_id IS NOT NULL").fetchone()[0] == 1
    capsys.readouterr()
    assert cli.main(["search", "--index", str(out), "--text", "pleural effusion", "--k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    api = Index.open(out, model=tiny, pretrained=str(checkpoint.resolve())).search_text("pleural effusion", k=3)
    assert [r["study_id"] for r in res[0]["results"]] == [r["study_id"] for r in api] == ["s3"]
    assert cli.main(["search", "--index", str(out), "--image", str(dicom_path()), "--k", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("query: ") and "  1. " in text and "study s3" in text


def test_cli_errors_are_one_line_and_exit_2(archive, checkpoint, tmp_path, capsys):
    from open_clip_cxr import cli
    assert cli.main(["search", "--index", str(tmp_path / "missing"), "--text", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("open-clip-cxr search: error: no index at") and "\n" not in err
    assert cli.main(["search", "--index", str(tmp_path)]) == 2
    assert "--text" in capsys.readouterr().err
    assert cli.main(["index", "--model", "cxr-llm-tiny", "--out", str(tmp_path / "i")]) == 2
    assert "exactly one of --shards" in capsys.readouterr().err


def test_demo_step_indexes_held_out_films_and_prints_both_queries(tmp_path, capsys):
    from open_clip_cxr.search.demo import index_and_query
    write_archive(tmp_path, 0, 2).rename(tmp_path / "shards")
    (tmp_path / "images.csv").write_text(f"image,split\n{tmp_path / 'imgs' / 'img1.png'},test\n")
    res = index_and_query(tmp_path, model="cxr-llm-tiny", k=3)
    out = capsys.readouterr().out
    assert "query: text 'Patchy airspace" in out and f"query: image {tmp_path / 'imgs' / 'img1.png'}" in out
    assert [r["study_id"] for r in res["text"]] == ["s0"]
    assert res["image"][0]["query_match"] and "the query image's own study" in out


def test_local_dir_names_are_stored_absolute(tmp_path, monkeypatch):
    from open_clip_cxr.search.model_record import norm_model_name
    monkeypatch.chdir(tmp_path)
    assert norm_model_name("local-dir:runs/export") == f"local-dir:{tmp_path.resolve() / 'runs' / 'export'}"
    assert norm_model_name("cxr-llm-tiny") == "cxr-llm-tiny"


def test_a_tokenizer_with_other_text_rules_is_refused_for_adding_and_warned_for_search(tiny, archive, built,
                                                                                       tmp_path, caplog):
    """The probe text cannot show the tokenizer's text rules, so the record keeps them: adding with
    another reading would index reports two ways (refused); searching reads only the queries the new
    way (a warning). An index built before the record had them kept administrative lines."""
    import shutil
    import open_clip
    from open_clip_cxr.search import Index, SearchIndexError
    model, pre, tok = tiny
    assert json.loads((built / "manifest.json").read_text())["model"]["text_rules"]["drop_admin_lines"] is True
    keep = open_clip.get_tokenizer("cxr-llm-tiny", drop_admin_lines=False)
    with pytest.raises(SearchIndexError, match="drop_admin_lines True then, False now.*build a new index with --out"):
        build((model, pre, keep), built, archive["b"], add=True)
    caplog.clear()
    hits = Index.open(built, model=(model, pre, keep)).search_text(["No pleural effusion."], k=2)
    assert hits and "drop_admin_lines True then, False now" in caplog.text
    # an index whose manifest predates the record: read as built with administrative lines kept
    old = tmp_path / "old"
    shutil.copytree(built, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["model"]["text_rules"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SearchIndexError, match="drop_admin_lines False then, True now"):
        build(tiny, old, archive["b"], add=True)
    Index.open(old, model=(model, pre, keep))     # the same reading: no refusal
