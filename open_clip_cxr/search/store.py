"""The files of an index folder: manifest.json, meta.sqlite, images.faiss, reports.faiss.

    manifest.json   format version, the model (name, checkpoint, config hash, probe embeddings),
                    preprocessing, similarity, FAISS index kind and parameters, sources, counts
    meta.sqlite     `images` (one row per image) and `studies` (one row per study, with the
                    report and its sections); each row keeps its float32 embedding, so a FAISS
                    file can always be rebuilt from it; `done` lists the encoded chunks
    images.faiss    image embeddings; FAISS id = images.id
    reports.faiss   report embeddings, one per study; FAISS id = studies.id

Row ids are dense and start at 0, so a FAISS result joins back with
`SELECT * FROM images WHERE id = ?` (or a JOIN on study_id to `studies`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np

FORMAT = "open_clip_cxr.search"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DB = "meta.sqlite"
FAISS_FILES = {"images": "images.faiss", "studies": "reports.faiss"}
OUR_FILES = (MANIFEST, DB, *FAISS_FILES.values())
SIMILARITY = "cosine: inner product of L2-normalised embeddings (FAISS METRIC_INNER_PRODUCT)"

# FAISS index kinds: exact by default; the others trade a little recall for speed at millions of items.
KINDS = ("flat", "hnsw", "ivf", "ivfpq")
DEFAULT_PARAMS = {
    "flat": {"store": "fp32"},
    "hnsw": {"store": "fp32", "m": 32, "ef_construction": 80, "ef_search": 128},
    "ivf": {"store": "fp32", "nlist": None, "nprobe": 32},   # nlist None: about 4*sqrt(N), set when trained
    "ivfpq": {"store": "fp32", "nlist": None, "nprobe": 32, "pq_m": 64},
}
# How flat, hnsw and ivf keep each vector (FAISS scalar quantizers). fp32: the embedding itself
# (2 KB at D=512). fp16: IEEE half precision (half the bytes; scores are exact inner products
# with the fp16-rounded vectors). int8: one byte per dimension on a per-dimension range learnt
# from a sample (a quarter of the bytes; an approximation). ivfpq compresses with PQ instead.
STORES = ("fp32", "fp16", "int8")
STORE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def check_store(kind: str, store: str) -> str:
    store = store or "fp32"
    if store not in STORES:
        raise SearchIndexError(f"unknown --store {store!r}; choose from {', '.join(STORES)}")
    if kind == "ivfpq" and store != "fp32":
        raise SearchIndexError(f"--store {store} does not apply to --index-kind ivfpq (PQ codes are already "
                               "compressed); use --store fp16/int8 with flat, ivf or hnsw")
    return store


def _qtype(store: str):
    import faiss
    return {"fp16": faiss.ScalarQuantizer.QT_fp16, "int8": faiss.ScalarQuantizer.QT_8bit}[store]

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,          -- = the FAISS id in images.faiss
    key TEXT NOT NULL UNIQUE,        -- the shard sample key (source/study/image)
    study_id TEXT NOT NULL,
    image_id TEXT, view TEXT, split TEXT,
    image_path TEXT,                 -- the original file, or SHARD_URL#KEY
    thumbnail BLOB,                  -- small PNG (longest side 160)
    emb BLOB NOT NULL                -- float32 embedding
);
CREATE INDEX IF NOT EXISTS images_study ON images(study_id);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,          -- = the FAISS id in reports.faiss
    study_id TEXT NOT NULL UNIQUE,
    patient_id TEXT, split TEXT, view TEXT, source TEXT,
    report TEXT, findings TEXT, impression TEXT,
    emb BLOB NOT NULL                -- float32 embedding of the report
);
CREATE TABLE IF NOT EXISTS done (unit TEXT PRIMARY KEY, images INTEGER, skipped INTEGER);
"""


class SearchIndexError(ValueError):
    """A user-facing problem with an index folder: missing, newer, incomplete, another model."""


# ---------------------------------------------------------------- manifest

def manifest_path(folder) -> Path:
    return Path(folder) / MANIFEST


def read_manifest(folder, *, require_complete: bool = True) -> dict:
    """The manifest, after checking that it exists, is ours, and is not from a newer version."""
    path = manifest_path(folder)
    if not Path(folder).is_dir() or not path.exists():
        raise SearchIndexError(f"no index at {folder}: build one with `open-clip-cxr index --model M "
                               f"--shards PATTERN --out {folder}`")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SearchIndexError(f"{path} is not a readable index manifest ({exc}); rebuild the index") from None
    if m.get("format") != FORMAT:
        raise SearchIndexError(f"{path} is not an open_clip_cxr search index manifest")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise SearchIndexError(f"index {folder} was written by a newer open_clip_cxr (index format "
                               f"{m['format_version']}, this version reads up to {FORMAT_VERSION}): upgrade open_clip_cxr")
    if require_complete and not m.get("complete"):
        raise SearchIndexError(f"index {folder} is incomplete (an interrupted `open-clip-cxr index` run): "
                               "rerun the same command to finish it")
    return m


def write_manifest(folder, manifest: dict) -> None:
    path = manifest_path(folder)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- model identity

def config_hash(model, preprocess_cfg: dict) -> str:
    """sha256 of the architecture (parameter names, shapes, dtypes) and the preprocessing."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(json.dumps(preprocess_cfg, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def preprocess_config(model) -> dict:
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    return json.loads(json.dumps(dict(cfg), default=str))


PROBE_TEXT = "Probe: the lungs are clear. No pleural effusion."


def probe_image():
    """A fixed synthetic 8-bit film-like gradient, so the probe goes through the real preprocessing."""
    from PIL import Image
    y, x = np.mgrid[0:96, 0:80]
    a = (128 + 100 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.uint8)
    return Image.fromarray(a, mode="L")


# ---------------------------------------------------------------- sqlite

def connect(folder) -> sqlite3.Connection:
    con = sqlite3.connect(str(Path(folder) / DB), isolation_level=None)   # explicit BEGIN/COMMIT
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    return con


def iter_embeddings(con: sqlite3.Connection, table: str, start: int = 0, batch: int = 65536
                    ) -> Iterator[Tuple[int, np.ndarray]]:
    """(first id, float32 [n, D]) batches of rows with id >= start, in id order."""
    assert table in FAISS_FILES
    while True:
        rows = con.execute(f"SELECT id, emb FROM {table} WHERE id >= ? ORDER BY id LIMIT ?", (start, batch)).fetchall()
        if not rows:
            return
        if rows[0][0] != start or rows[-1][0] != start + len(rows) - 1:
            raise SearchIndexError(f"{table} ids are not dense from {start}: the index folder is damaged; rebuild it")
        yield start, np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
        start += len(rows)


def count(con: sqlite3.Connection, table: str) -> int:
    return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# ---------------------------------------------------------------- faiss

def default_nlist(n: int) -> int:
    """About 4*sqrt(N) cells, but at least 39 training points per cell (FAISS's own floor)."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39)))


def new_faiss(kind: str, dim: int, params: dict):
    import faiss
    if kind not in KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    store = check_store(kind, params.get("store"))
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim) if store == "fp32" else faiss.IndexScalarQuantizer(dim, _qtype(store), ip)
    if kind == "hnsw":
        m = int(params["m"])
        index = faiss.IndexHNSWFlat(dim, m, ip) if store == "fp32" else faiss.IndexHNSWSQ(dim, _qtype(store), m, ip)
        index.hnsw.efConstruction = int(params["ef_construction"])
        return index
    if kind in ("ivf", "ivfpq"):
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            if store != "fp32":
                return faiss.IndexIVFScalarQuantizer(quantizer, dim, int(params["nlist"]), _qtype(store), ip)
            return faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
        if dim % int(params["pq_m"]):
            raise SearchIndexError(f"--pq-m {params['pq_m']} must divide the embedding dimension {dim}")
        return faiss.IndexIVFPQ(quantizer, dim, int(params["nlist"]), int(params["pq_m"]), 8,
                                faiss.METRIC_INNER_PRODUCT)


def set_search_params(index, kind: str, params: dict) -> None:
    import faiss
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])
    elif kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


def train_sample(vectors_batches, n: int, max_train: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of at most `max_train` rows out of `n`, read batch by batch (memory: the sample only)."""
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(n, size=min(n, max_train), replace=False))
    out, pos = [], 0
    for _, x in vectors_batches:
        sel = keep[(keep >= pos) & (keep < pos + len(x))] - pos
        out.append(x[sel])
        pos += len(x)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def sync_faiss(folder, con: sqlite3.Connection, table: str, kind: str, params: dict, dim: int,
               max_train: int = 100_000) -> Tuple[object, dict]:
    """Bring FOLDER/<table>.faiss up to date with the table: add only rows it lacks (train first if needed).

    Returns (index, params) with IVF's nlist filled in when this call trained it.
    """
    import faiss
    path = Path(folder) / FAISS_FILES[table]
    n = count(con, table)
    index = None
    if path.exists():
        index = faiss.read_index(str(path))
        if index.ntotal > n or index.d != dim:
            index = None                       # does not match the table: rebuild from the rows
    if index is None:
        params = dict(params)
        if kind in ("ivf", "ivfpq") and not params.get("nlist"):
            params["nlist"] = default_nlist(n)
        index = new_faiss(kind, dim, params)
    if not index.is_trained:
        if n == 0:
            return index, params
        sample = train_sample(iter_embeddings(con, table), n, max_train)
        if len(sample) < getattr(index, "nlist", 0):
            raise SearchIndexError(f"--nlist {params['nlist']} needs at least that many items; the index has {n}")
        index.train(sample)
    start = index.ntotal
    if start < n:
        for _, x in iter_embeddings(con, table, start):
            index.add(np.ascontiguousarray(x))
        tmp = path.with_suffix(".faiss.tmp")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    elif not path.exists():
        faiss.write_index(index, str(path))
    return index, params
