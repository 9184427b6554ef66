"""Loader: exactly-once evaluation across ranks/workers, training batches, text choice, corrupt data."""
import io
import json
import multiprocessing
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import data_fixtures as fx
from open_clip_cxr.data.encode import EncodeOptions
from open_clip_cxr.data.loader import (DecodeSample, SampleSource, Task, make_loader,
                                       split_tasks)
from open_clip_cxr.data.shard_writer import ShardLimits, write_shards
from open_clip_cxr.data.sources import iter_source
from open_clip_cxr.data.text_choice import choose_text, normalise_choice

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def length_tokenizer(texts):
    """Stands in for a real tokenizer: one token per text, its length."""
    return torch.tensor([[len(t)] for t in texts])


def preprocess(size=64):
    from open_clip_cxr.vision.transforms import cxr_transform
    return cxr_transform(size, MEAN, STD)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """7 real radiographs (6 JPEGs + the DICOM) in 4 shards of <= 2 samples, with report variants."""
    root = tmp_path_factory.mktemp("loader")
    t = fx.make_table(root / "tbl", n=7)
    m = write_shards(iter_source("table", table=t["table"]), root / "out", progress=False,
                     options=EncodeOptions(max_side=96, variants=True), limits=ShardLimits(samples_per_shard=2))
    urls = sorted(str(root / "out" / name) for name in m["shards"])
    keys = sorted(_all_keys(urls))
    assert len(keys) == 7 and len(urls) >= 4
    return urls, keys


def _all_keys(urls):
    keys = []
    for u in urls:
        with tarfile.open(u) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


def test_split_tasks_partitions_every_sample():
    """Pure check over many shapes: each (shard, index) read by exactly one (rank, worker)."""
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(0, 7) for _ in range(rng.randint(1, 9))]
        ws, nw = rng.randint(1, 5), rng.randint(1, 4)
        seen = Counter()
        for r in range(ws):
            for w in range(nw):
                for t in split_tasks(split_tasks([Task(str(i)) for i in range(len(sizes))], ws, r), nw, w):
                    seen.update((t.url, i) for i in range(sizes[int(t.url)]) if i % t.mod == t.res)
        assert seen == Counter((str(s), i) for s, n in enumerate(sizes) for i in range(n))


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_eval_reads_every_sample_once(shards, world_size, num_workers):
    urls, keys = shards
    got = []
    for rank in range(world_size):
        loader = make_loader(urls, preprocess=preprocess(), tokenizer=length_tokenizer, batch_size=3, train=False,
                             world_size=world_size, rank=rank, num_workers=num_workers, return_keys=True)
        for images, tokens, batch_keys in loader:
            assert images.shape[1:] == (3, 64, 64) and tokens.shape == (len(batch_keys), 1)
            got += batch_keys
    assert sorted(got) == keys


def _read_as_rank(rank, urls, pg_file, out_file):
    """Child process: join a 2-process gloo group; the loader must find its rank by itself."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=2)
    try:
        loader = make_loader(urls, preprocess=preprocess(32), tokenizer=length_tokenizer, batch_size=2,
                             train=False, return_keys=True)
        keys = [k for _, _, batch in loader for k in batch]
        studies = [s for _, s, *_ in SampleSource(urls, preprocess=preprocess(32))]
        Path(out_file).write_text(json.dumps({"rank": loader.rank, "world": loader.world_size,
                                              "keys": keys, "studies": studies}))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_read_disjoint_halves(shards, tmp_path):
    urls, keys = shards
    ctx = multiprocessing.get_context("fork")  # the children inherit the imports: starts in milliseconds
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_read_as_rank, args=(r, urls, tmp_path / "pg", outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = [json.loads(o.read_text()) for o in outs]
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    assert results[0]["keys"] and results[1]["keys"]
    assert not set(results[0]["keys"]) & set(results[1]["keys"])
    assert sorted(results[0]["keys"] + results[1]["keys"]) == keys
    assert len(results[0]["studies"]) + len(results[1]["studies"]) == len(keys)


def test_odd_shard_count_two_ranks(shards):
    urls, keys = shards
    for n_shards in (1, 3):
        subset = urls[:n_shards]
        want = sorted(_all_keys(subset))
        halves = [[k for k, *_ in SampleSource(subset, world_size=2, rank=r)] for r in range(2)]
        assert sorted(halves[0] + halves[1]) == want and not set(halves[0]) & set(halves[1])


def test_train_loader_epochs_and_batches(shards):
    urls, keys = shards
    loader = make_loader(urls, preprocess=preprocess(), tokenizer=length_tokenizer, batch_size=4, train=True,
                         shuffle_buffer=5, seed=1, world_size=2, rank=1, epoch_samples=40)
    assert loader.num_batches == 5  # ceil(40 / (4 * 2)) per rank
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == loader.num_batches
        assert all(b[0].shape == (4, 3, 64, 64) and b[1].shape == (4, 1) for b in batches)
    # without epoch_samples the manifest next to the shards gives the epoch size
    loader = make_loader(urls, preprocess=preprocess(), tokenizer=length_tokenizer, batch_size=4, train=True)
    assert loader.num_samples >= 7 and loader.num_batches == 2


def test_train_loader_needs_an_epoch_size_without_manifest(shards, tmp_path):
    copy = tmp_path / "lone-000000.tar"
    copy.write_bytes(Path(shards[0][0]).read_bytes())
    with pytest.raises(ValueError, match="epoch_samples"):
        make_loader([str(copy)], preprocess=None, tokenizer=None, batch_size=2, train=True)


def test_train_loader_with_workers(shards):
    urls, _ = shards
    loader = make_loader(urls, preprocess=preprocess(), tokenizer=None, batch_size=2, train=True, num_workers=2,
                         epoch_samples=8)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 4
    assert all(isinstance(b[1], list) and len(b[1]) == 2 for b in batches)


def _one_raw_sample(url):
    with tarfile.open(url) as tar:
        members = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:3]}
        key = tar.getmembers()[0].name.split(".", 1)[0]
    return dict(members, __key__=key)


def test_text_choice_probabilities(shards):
    urls, _ = shards
    raw = _one_raw_sample(urls[0])
    meta = json.loads(raw["json"])
    assert meta["sections"]["findings"] and meta["sections"]["impression"]
    assert any(v["equivalent"] for v in meta["variants"])
    probs = {"report": 0.5, "impression": 0.3, "findings": 0.1, "variant": 0.1}
    decode = DecodeSample(None, probs, train=True, seed=0)
    n = 3000
    kinds = Counter(decode(raw)["text_kind"] for _ in range(n))
    for kind, p in probs.items():
        assert abs(kinds[kind] / n - p) < 0.035, (kind, kinds)
    equivalent = {v["text"] for v in meta["variants"] if v["equivalent"]}
    negatives = {v["text"] for v in meta["variants"] if not v["equivalent"]} - equivalent
    texts = {decode(raw)["text"] for _ in range(300)}
    assert not texts & negatives  # hard negatives are never used as the positive text


def test_text_choice_falls_back_to_report():
    rng = random.Random(0)
    meta = {"sections": {"findings": "", "impression": " "},
            "variants": [{"text": "wrong side", "equivalent": False}]}
    for kind in ("findings", "impression", "variant"):
        assert choose_text("the report", meta, normalise_choice({kind: 1.0}, True), rng) == ("the report", "report")
    assert normalise_choice(None, train=False) == {"report": 1.0}
    with pytest.raises(ValueError):
        normalise_choice({"summary": 1.0}, True)


def test_corrupt_samples_and_damaged_shard_are_skipped(shards, tmp_path):
    urls, _ = shards
    good = _one_raw_sample(urls[0])
    bad_shard = tmp_path / "bad-000000.tar"
    with tarfile.open(bad_shard, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("ok1.png", good["png"]), add("ok1.txt", good["txt"]), add("ok1.json", good["json"])
        add("garbage.png", b"\x89PNG not really"), add("garbage.txt", b"text"), add("garbage.json", b"{}")
        add("notext.png", good["png"])
        add("ok2.png", good["png"]), add("ok2.txt", good["txt"]), add("ok2.json", good["json"])
    cut = tmp_path / "cut-000000.tar"
    data = Path(urls[1]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    src = SampleSource([str(bad_shard), str(cut)], preprocess=preprocess(32))
    keys = [k for k, *_ in src]
    assert keys[:2] == ["ok1", "ok2"]
    assert src.skipped.value >= 3  # garbage image, missing txt, the truncated shard


def test_pipe_urls_and_brace_patterns(shards):
    urls, keys = shards
    folder = Path(urls[0]).parent
    piped = [f"pipe:cat {u}" for u in urls]
    assert sorted(k for k, *_ in SampleSource(piped)) == keys
    splits = sorted({Path(u).name.split("-")[0] for u in urls})
    patterns = []
    for split in splits:
        n = len(list(folder.glob(f"{split}-*.tar")))
        patterns.append(str(folder / (f"{split}-{{000000..{n - 1:06d}}}.tar" if n > 1 else f"{split}-000000.tar")))
    assert sorted(k for k, *_ in SampleSource("::".join(patterns))) == keys


def test_sample_source_gives_tensors_and_study_ids(shards):
    urls, keys = shards
    items = list(SampleSource(urls, preprocess=preprocess(48)))
    assert sorted(k for k, *_ in items) == keys
    for key, study, image, text, meta in items:
        assert image.shape == (3, 48, 48) and study == meta["study_id"] and text.strip()
        assert key.startswith("table_")
