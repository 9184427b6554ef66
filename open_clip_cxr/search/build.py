"""Build an index folder: encode images and reports chunk by chunk, resumably, and append with `add`.

Sources are read in order, each cut into chunks of `chunk_size` samples. A chunk's rows and
its entry in the `done` table are committed in one SQLite transaction, so a killed run loses
at most the chunk in flight and a rerun skips every committed chunk without encoding it
again. The FAISS files are derived from the rows at the end of each run, adding only the rows
they lack. Images go through the project's own readers: WebDataset shards through
`open_clip_cxr.data.loader` (the evaluation reader), dataset layouts through
`open_clip_cxr.data.sources` and `open_clip_cxr.vision.io.load_image`; embeddings through
`open_clip_cxr.eval.encode`.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from open_clip_cxr.search import store
from open_clip_cxr.search.model_record import check_model, model_record
from open_clip_cxr.search.store import SearchIndexError

THUMB_SIDE = 160


# ---------------------------------------------------------------- sources

def shard_sources(urls) -> List[dict]:
    """One source per shard file, so `add` can append shards one by one."""
    from open_clip_cxr.data.loader import expand_urls
    return [{"kind": "shards", "url": u} for u in expand_urls(urls)]


def table_source(source: str, **kwargs) -> dict:
    """A dataset layout read by `open_clip_cxr.data.sources.iter_source` (e.g. source='table', table=CSV)."""
    spec = {"kind": "records", "source": source}
    spec.update({k: (str(Path(v).resolve()) if k in ("table", "root", "reports") and v else v)
                 for k, v in kwargs.items() if v is not None})
    return spec


def source_id(spec: dict) -> str:
    if spec["kind"] == "shards":
        return spec["url"]
    return "records:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


class _WithThumb:
    """Preprocess for the model and keep a small PNG of the same decoded film."""

    def __init__(self, preprocess: Callable, side: int = THUMB_SIDE):
        self.preprocess, self.side = preprocess, side

    def __call__(self, img):
        thumb = img.copy()
        thumb.thumbnail((self.side, self.side))
        buf = io.BytesIO()
        thumb.save(buf, format="PNG", optimize=True)
        return self.preprocess(img), buf.getvalue()


Item = Tuple[str, str, object, str, dict, str]   # key, study_id, (tensor, thumb), text, meta, image_path


def _raw_shard_samples(url: str, skipped) -> Iterator[dict]:
    from open_clip_cxr.data.loader import _EvalShards   # the evaluation reader: every sample once, in order
    yield from _EvalShards([url], 1, 0, skipped)


def iter_chunks(spec: dict, transform: Callable, chunk_size: int, done: set, skipped: List[int],
                pool=None) -> Iterator[Tuple[int, Optional[List[Item]], int]]:
    """(chunk index, items or None when the chunk is already done, samples in chunk), in order.

    Done chunks are counted, not decoded. `skipped[0]` counts unreadable samples. `pool`: an
    executor whose order-keeping `map` decodes and preprocesses a chunk's samples (`--workers`);
    the tar files are still read in order by one reader, so the chunks and their contents are
    the same whatever the number of workers.
    """
    from open_clip_cxr.data.loader import DecodeSample, SkipCounter
    sid = source_id(spec)
    if spec["kind"] == "shards":
        counter = SkipCounter()
        decode = DecodeSample(transform, train=False)
        raw = _raw_shard_samples(spec["url"], counter)

        def make(sample):
            try:
                s = decode(sample)
            except Exception as exc:      # the loader's policy: warn, count, continue
                counter(exc)
                return None
            return s["key"], str(s["study_id"]), s["image"], s["text"], s["meta"], f"{spec['url']}#{s['key']}"
    else:
        from open_clip_cxr.data.sources import Sample, iter_source, sample_meta
        from open_clip_cxr.vision.io import ImageReadError, load_image
        kw = {k: v for k, v in spec.items() if k not in ("kind", "source")}
        raw = (r for r in iter_source(spec["source"], **kw) if isinstance(r, Sample))

        def make(sample):
            try:
                image = transform(load_image(sample.image_path, name=sample.key, mode="L"))
            except (ImageReadError, OSError) as exc:
                print(f"skipping {sample.image_path}: {exc}", file=sys.stderr)
                return None
            return sample.key, sample.study_id, image, sample.report.text, sample_meta(sample), sample.image_path

    chunk: list = []
    index = 0

    def flush():
        unit = f"{sid}#{index}"
        if unit in done:
            return index, None, len(chunk)
        items = [it for it in (pool.map(make, chunk) if pool is not None else map(make, chunk)) if it is not None]
        skipped[0] += len(chunk) - len(items)
        return index, items, len(chunk)

    for sample in raw:
        chunk.append(sample)
        if len(chunk) == chunk_size:
            yield flush()
            chunk, index = [], index + 1
    if chunk:
        yield flush()


# ---------------------------------------------------------------- build

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _remove_index(folder: Path) -> None:
    for name in store.OUR_FILES + (store.DB + "-wal", store.DB + "-shm"):
        p = folder / name
        if p.exists():
            p.unlink()


def build_index(out, sources: Sequence[dict], *, model, preprocess, tokenizer, model_name: str,
                pretrained: Optional[str] = None, precision: str = "fp32", add: bool = False,
                overwrite: bool = False, kind: Optional[str] = None, params: Optional[dict] = None,
                chunk_size: int = 256, batch_size: int = 64, device="cpu", progress: bool = True,
                max_chunks: Optional[int] = None, workers: int = 1, log=print) -> dict:
    """Encode `sources` into the index folder `out`; returns the manifest.

    `workers` > 1 decodes and preprocesses each chunk's images in that many threads (PIL's
    decoders and resizes, zlib and torch release the GIL) while one reader walks the shards.

    A folder holding an unfinished build of the same sources resumes it. `add=True` appends
    sources the index does not have yet. `max_chunks` stops after encoding that many new
    chunks (the manifest stays incomplete; rerun to finish).
    """
    from open_clip_cxr.eval.encode import encode_images, encode_texts
    out = Path(out)
    sources = list(sources)
    if not sources:
        raise SearchIndexError("no sources to index: give --shards or --source")
    if chunk_size < 1 or batch_size < 1:
        raise SearchIndexError("--chunk-size and --batch-size must be positive")
    if not isinstance(workers, int) or workers < 1:
        raise SearchIndexError(f"--workers must be a positive whole number, got {workers!r}")
    current = model_record(model, preprocess, tokenizer, model_name, pretrained, precision, device)
    manifest = None
    if store.manifest_path(out).exists():
        if overwrite:
            _remove_index(out)
        else:
            manifest = store.read_manifest(out, require_complete=False)
            check_model(out, manifest, current)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise SearchIndexError(f"{out} exists and is not an index folder: choose an empty --out, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)

    if manifest is None:
        kind = kind or "flat"
        if kind not in store.KINDS:
            raise SearchIndexError(f"unknown index kind {kind!r}; choose from {', '.join(store.KINDS)}")
        p = {**store.DEFAULT_PARAMS[kind], **{k: v for k, v in (params or {}).items() if v is not None}}
        p["store"] = store.check_store(kind, p.get("store"))
        manifest = {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "created": _now(),
                    "model": current, "preprocess": current["preprocess"], "similarity": store.SIMILARITY,
                    "index": {"kind": kind, "params": p, "tables": {}}, "sources": [],
                    "chunk_size": chunk_size, "counts": {}, "complete": False}
        from open_clip_cxr import __version__
        manifest["library_version"] = __version__
    else:
        if kind and kind != manifest["index"]["kind"]:
            raise SearchIndexError(f"index {out} is a {manifest['index']['kind']!r} index; --index-kind {kind} "
                                   "applies only to a new index (use --overwrite to rebuild it)")
        have = manifest["index"]["params"].get("store", "fp32")
        want = (params or {}).get("store")
        if want and want != have:
            store.check_store(manifest["index"]["kind"], want)     # an unknown name is refused as such
            raise SearchIndexError(f"index {out} stores {have} vectors; --store {want} applies only to a new "
                                   "index (use --overwrite to rebuild it)")
        if params:   # search-time settings may change; build-time ones may not
            manifest["index"]["params"].update({k: v for k, v in params.items()
                                                if v is not None and k in ("nprobe", "ef_search")})
    old_ids = [source_id(s) for s in manifest["sources"]]
    new = [s for s in sources if source_id(s) not in old_ids]
    if old_ids and not add and [source_id(s) for s in sources] != old_ids:
        raise SearchIndexError(f"{out} already indexes other sources ({len(old_ids)}: {old_ids[0]}...): "
                               "pass --add to append these, or --overwrite to start again")
    if add and old_ids and not new:
        log(f"{out}: every source is indexed already; nothing to add")
    manifest["sources"] = manifest["sources"] + new
    manifest["complete"] = False
    store.write_manifest(out, manifest)

    chunk_size = manifest["chunk_size"]
    con = store.connect(out)
    pool = None
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(workers, thread_name_prefix="index-decode")
    try:
        done = {r[0] for r in con.execute("SELECT unit FROM done")}
        n_img, n_study = store.count(con, "images"), store.count(con, "studies")
        known = {r[0] for r in con.execute("SELECT study_id FROM studies")}
        total = _known_total(manifest["sources"])
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="index", unit="img")
        transform = _WithThumb(preprocess)
        encoded_chunks, skipped, dup = 0, [0], 0
        stopped = False
        for spec in manifest["sources"]:
            sid = source_id(spec)
            if f"{sid}#all" in done:
                n = con.execute("SELECT SUM(images) FROM done WHERE unit LIKE ?", (sid + "#%",)).fetchone()[0] or 0
                if bar is not None:
                    bar.update(n)
                continue
            for ci, items, n_raw in iter_chunks(spec, transform, chunk_size, done, skipped, pool):
                if bar is not None:
                    bar.update(n_raw)
                if items is None:
                    continue
                if max_chunks is not None and encoded_chunks >= max_chunks:
                    stopped = True
                    break
                rows_i, rows_s, d = _encode_chunk(model, tokenizer, items, known, n_img, n_study, con,
                                                  batch_size, device, encode_images, encode_texts)
                dup += d
                con.execute("BEGIN")
                con.executemany("INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?)", rows_i)
                con.executemany("INSERT INTO studies VALUES (?,?,?,?,?,?,?,?,?,?)", rows_s)
                con.execute("INSERT INTO done VALUES (?,?,?)", (f"{sid}#{ci}", n_raw, n_raw - len(items)))
                con.execute("COMMIT")
                n_img += len(rows_i)
                n_study += len(rows_s)
                known.update(r[1] for r in rows_s)
                encoded_chunks += 1
            if stopped:
                break
            con.execute("INSERT OR REPLACE INTO done VALUES (?,?,?)", (f"{sid}#all", 0, 0))
            done.add(f"{sid}#all")
        if bar is not None:
            bar.close()
        before = manifest.get("counts") or {}
        manifest["counts"] = {"images": n_img, "studies": n_study,
                              "skipped_unreadable": skipped[0] + before.get("skipped_unreadable", 0),
                              "skipped_duplicate_keys": dup + before.get("skipped_duplicate_keys", 0)}
        manifest["updated"] = _now()
        if stopped:
            store.write_manifest(out, manifest)
            log(f"stopped after {encoded_chunks} new chunks (--max-chunks); rerun the same command to continue")
            return manifest
        if n_img == 0:
            raise SearchIndexError("no images were read from the sources: check the shard pattern or table")
        dim = len(current["probe"]["image"])
        for table in store.FAISS_FILES:
            _, p = store.sync_faiss(out, con, table, manifest["index"]["kind"],
                                    manifest["index"]["tables"].get(table) or manifest["index"]["params"], dim)
            manifest["index"]["tables"][table] = p
        manifest["complete"] = True
        store.write_manifest(out, manifest)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        con.close()
    log(f"indexed {n_img} images of {n_study} studies into {out} ({encoded_chunks} chunks encoded in this run)")
    return manifest


def _known_total(sources) -> Optional[int]:
    from open_clip_cxr.data.manifest import count_samples
    urls = [s["url"] for s in sources if s["kind"] == "shards"]
    if len(urls) != len(sources):
        return None
    return count_samples(urls)


def _blob(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype=np.float32).tobytes()


def _encode_chunk(model, tokenizer, items, known, n_img, n_study, con, batch_size, device, encode_images, encode_texts):
    """Rows for `images` and `studies` (new studies only); keys already indexed are left out."""
    keys = [it[0] for it in items]
    have = set()
    for i in range(0, len(keys), 500):
        part = keys[i:i + 500]
        have.update(r[0] for r in con.execute(
            f"SELECT key FROM images WHERE key IN ({','.join('?' * len(part))})", part))
    seen, fresh = set(), []
    for it in items:
        if it[0] not in have and it[0] not in seen:
            seen.add(it[0])
            fresh.append(it)
    dup = len(items) - len(fresh)
    if not fresh:
        return [], [], dup
    emb = encode_images(model, [(k, s, img[0], t, m) for k, s, img, t, m, _ in fresh], batch_size, device,
                        progress=False).emb.numpy()
    rows_i = []
    new_studies: dict = {}
    for j, (key, study, (tensor, thumb), text, meta, path) in enumerate(fresh):
        rows_i.append((n_img + j, key, study, meta.get("image_id"), meta.get("view"), meta.get("split"),
                       path, thumb, _blob(emb[j])))
        if study not in known and study not in new_studies:
            new_studies[study] = (text, meta)
    rows_s = []
    if new_studies:
        studies = list(new_studies)
        texts = [new_studies[s][0] or "" for s in studies]
        if any(not t.strip() for t in texts):
            bad = studies[[not t.strip() for t in texts].index(True)]
            raise SearchIndexError(f"study {bad!r} has an empty report; rewrite the shards with `open-clip-cxr shards`")
        temb = encode_texts(model, tokenizer, texts, batch_size, device).numpy()
        for j, s in enumerate(studies):
            text, meta = new_studies[s]
            sec = meta.get("sections") or {}
            rows_s.append((n_study + j, s, meta.get("patient_id"), meta.get("split"), meta.get("view"),
                           meta.get("source"), text, sec.get("findings") or "", sec.get("impression") or "",
                           _blob(temb[j])))
    return rows_i, rows_s, dup
