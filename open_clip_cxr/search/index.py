"""`Index`: open an index folder and search it by report text or by image; results are plain dicts.

    from open_clip_cxr.search import Index
    index = Index.open("runs/archive-index")           # loads the model named in the manifest
    hits = index.search_text("left lower lobe consolidation with effusion", k=5)
    hits = index.search_image(["film.dcm"], k=5)[0]    # a list in, one result list per query out

Text queries rank studies by their best-matching image (study-level grouping, as the
evaluation does); image queries rank studies by their report (the nearest reports, as in
retrieval-based report drafting). Each record: rank, study_id, score, patient_id, split, view,
snippet, findings, impression, report, images [{id, key, view, image_path, score}], and
`query_match` (True for the study whose own image was the query).

Threads: searching is read-only, so concurrent calls (the threads `serve` answers requests
on) search FAISS and read SQLite at the same time, without a lock: FAISS CPU indexes allow
concurrent searches (search parameters are set once, when the index is opened), and each
thread reads SQLite through its own read-only connection. Only the query encoder runs one
call at a time: a forward pass already uses every torch thread, and a Hugging Face fast
tokenizer can fail when two threads call it at once ("Already borrowed"). Several queries given together
(a list, repeated --text) are encoded in one batch and searched in one FAISS call.
"""
from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from open_clip_cxr.search import store
from open_clip_cxr.search.store import SearchIndexError

SAME_IMAGE = 0.9995    # image-image cosine above which a query image is taken to be that archived image
IMAGES_PER_STUDY = 6


def snippet(findings: str, impression: str, report: str, n: int = 200) -> str:
    text = re.sub(r"\s+", " ", (impression or findings or report or "")).strip()
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


class Index:
    """A read-only view of an index folder, with the model that built it (loaded on first query)."""

    def __init__(self, folder, manifest: dict, model=None, model_name: Optional[str] = None,
                 pretrained: Optional[str] = None, device="cpu", precision: Optional[str] = None):
        import faiss
        self.folder, self.manifest, self.device = Path(folder), manifest, device
        self._model = model
        self._model_name = model_name or manifest["model"]["name"]
        self._pretrained = pretrained if pretrained is not None else manifest["model"].get("pretrained")
        self._precision = precision or manifest["model"].get("precision", "fp32")
        self._lock = threading.RLock()          # the query encoder (model load and forward passes) only
        self._local = threading.local()         # one read-only SQLite connection per thread
        self._cons: list = []
        self._cons_lock = threading.Lock()
        self.kind = manifest["index"]["kind"]
        self.faiss = {}
        for table, name in store.FAISS_FILES.items():
            path = self.folder / name
            if not path.exists():
                raise SearchIndexError(f"{path} is missing: rerun `open-clip-cxr index` on {folder} to rebuild it")
            index = faiss.read_index(str(path))
            if index.ntotal != manifest["counts"][table]:
                raise SearchIndexError(f"{path} holds {index.ntotal} vectors, the manifest {manifest['counts'][table]}: "
                                       "rerun `open-clip-cxr index` with the same arguments to repair it")
            store.set_search_params(index, self.kind, {**manifest["index"]["params"],
                                                       **(manifest["index"]["tables"].get(table) or {})})
            self.faiss[table] = index
        self._connect()
        if model is not None:
            self._check(model)

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, folder, model=None, *, model_name: Optional[str] = None, pretrained: Optional[str] = None,
             device="cpu", precision: Optional[str] = None) -> "Index":
        """Open FOLDER. `model`: an already built (model, preprocess, tokenizer) to query with.

        `model_name`/`pretrained` default to the manifest's; naming another model is refused, as is
        a model whose architecture, preprocessing or probe embeddings differ from the index's.
        """
        from open_clip_cxr.search.model_record import norm_model_name
        manifest = store.read_manifest(folder)
        built = manifest["model"]
        model_name = norm_model_name(model_name) if model_name is not None else None
        if model_name is not None and model_name != built["name"]:
            raise SearchIndexError(f"index {folder} was built with model {built['name']!r}, not {model_name!r}; "
                                   "embeddings of different models are not comparable")
        return cls(folder, manifest, model, model_name, pretrained, device, precision)

    def _check(self, model_tuple) -> None:
        from open_clip_cxr.search.model_record import check_model, model_record
        model, preprocess, tokenizer = model_tuple
        rec = model_record(model, preprocess, tokenizer, self._model_name, self._pretrained,
                           self._precision, self.device)
        if self._pretrained == self.manifest["model"].get("pretrained"):
            rec["pretrained"] = self._pretrained   # same string as stored: do not re-resolve paths
        check_model(self.folder, self.manifest, rec, strict_text_rules=False)

    @property
    def model(self):
        """(model, preprocess, tokenizer), loaded from the manifest's model on first use and checked."""
        with self._lock:
            if self._model is None:
                import open_clip_cxr
                model, _, preprocess = open_clip_cxr.create_model_and_transforms(
                    self._model_name, pretrained=self._pretrained, precision=self._precision, device=self.device)
                triple = (model.eval(), preprocess, open_clip_cxr.get_tokenizer(self._model_name))
                self._check(triple)
                self._model = triple
            return self._model

    def _connect(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(f"file:{self.folder / store.DB}?mode=ro", uri=True, check_same_thread=False)
            self._local.con = con
            with self._cons_lock:
                self._cons.append(con)
        return con

    @property
    def con(self) -> sqlite3.Connection:
        """This thread's read-only connection to meta.sqlite."""
        return self._connect()

    def close(self) -> None:
        with self._cons_lock:
            for con in self._cons:
                con.close()
            self._cons.clear()
        self._local = threading.local()

    def __len__(self) -> int:
        return self.manifest["counts"]["images"]

    # ---------------------------------------------------------------- encoding

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        from open_clip_cxr.eval.encode import encode_texts
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise SearchIndexError("no query given")
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise SearchIndexError("empty text query: type a finding, e.g. 'left lower lobe consolidation'")
        model, _, tokenizer = self.model
        with self._lock, torch.no_grad():
            return encode_texts(model, tokenizer, [t.strip() for t in texts], 64, self.device).numpy()

    def encode_image(self, images: Sequence) -> np.ndarray:
        """Paths, bytes, PIL images or arrays (DICOM and 16-bit PNG included, via `load_image`)."""
        from open_clip_cxr.eval.encode import _model_dtype
        from open_clip_cxr.vision.io import load_image
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise SearchIndexError("no query image given")
        model, preprocess, _ = self.model
        x = torch.stack([preprocess(load_image(im, mode="L")) for im in images])
        with self._lock, torch.no_grad():
            x = x.to(device=self.device, dtype=_model_dtype(model))
            return model.encode_image(x, normalize=True).float().cpu().numpy()

    # ---------------------------------------------------------------- searching

    def search_text(self, queries: Union[str, Sequence[str]], k: int = 10):
        """Studies whose images best match each report-like text. A str gives one list; a list, one per query."""
        single = isinstance(queries, str)
        res = self.search_text_vectors(self.encode_text(queries), k)
        return res[0] if single else res

    def search_image(self, images, k: int = 10):
        """Studies whose reports best match each image. One image gives one list; a list, one per image."""
        single = not isinstance(images, (list, tuple))
        res = self.search_image_vectors(self.encode_image(images), k)
        return res[0] if single else res

    def _k(self, k) -> int:
        if not isinstance(k, int) or k < 1:
            raise SearchIndexError(f"k must be a positive integer, got {k!r}")
        return k

    def search_text_vectors(self, q: np.ndarray, k: int = 10) -> List[List[dict]]:
        """Text embeddings [n, D] -> top-k studies each, ranked by the study's best image score."""
        k = self._k(k)
        q = self._as_queries(q)
        index = self.faiss["images"]
        n_total = index.ntotal
        fetch = min(n_total, max(4 * k, 32))
        scores, ids = index.search(q, fetch)             # all queries in one call
        out = []
        for qi in range(len(q)):
            s_row, i_row, f = scores[qi], ids[qi], fetch
            while True:
                keep = i_row >= 0
                i_row, s_row = i_row[keep], s_row[keep]
                study_of = self._image_studies(i_row.tolist())
                best: Dict[str, dict] = {}
                for i, s in zip(i_row.tolist(), s_row.tolist()):
                    st = study_of[i]
                    if st not in best:
                        best[st] = {"score": s, "hits": []}
                    best[st]["hits"].append((i, s))
                if len(best) >= k or f >= n_total:
                    break
                f = min(n_total, f * 4)                    # many images per study: fetch deeper for this query
                s_row, i_row = (a[0] for a in index.search(q[qi:qi + 1], f))
            ranked = list(best.items())[:k]     # faiss returns scores in descending order
            out.append(self._records(ranked))
        return out

    def search_image_vectors(self, q: np.ndarray, k: int = 10) -> List[List[dict]]:
        """Image embeddings [n, D] -> top-k studies each by report similarity; flags the query's own study."""
        k = self._k(k)
        q = self._as_queries(q)
        scores, ids = self.faiss["studies"].search(q, min(k, self.faiss["studies"].ntotal))
        matches = self.archived_study(q)
        out = []
        for qi in range(len(q)):
            pairs = [(int(i), float(s)) for i, s in zip(ids[qi], scores[qi]) if i >= 0]
            rows = {r[0]: r[1] for r in self._rows("SELECT id, study_id FROM studies WHERE id IN ({})",
                                                   [i for i, _ in pairs])}
            out.append(self._records([(rows[i], {"score": s, "hits": []}) for i, s in pairs], matches[qi]))
        return out

    def archived_study(self, q: np.ndarray) -> List[Optional[str]]:
        """For each image embedding: the study holding that very image (cosine >= SAME_IMAGE), else None.

        FAISS proposes the 4 nearest images; the cosine is then taken with their float32
        embeddings from SQLite, so an fp16 or int8 store does not hide an exact match.
        """
        q = self._as_queries(q)
        _, ids = self.faiss["images"].search(q, min(4, self.faiss["images"].ntotal))
        cand = sorted({int(i) for i in ids.ravel() if i >= 0})
        rows = {r[0]: (r[1], np.frombuffer(r[2], dtype=np.float32))
                for r in self._rows("SELECT id, study_id, emb FROM images WHERE id IN ({})", cand)}
        out = []
        for qi in range(len(q)):
            best, study = -2.0, None
            for i in ids[qi]:
                if i >= 0:
                    s = float(rows[int(i)][1] @ q[qi])
                    if s > best:
                        best, study = s, rows[int(i)][0]
            out.append(study if best >= SAME_IMAGE else None)
        return out

    def _as_queries(self, q) -> np.ndarray:
        q = np.ascontiguousarray(np.asarray(q, dtype=np.float32))
        if q.ndim == 1:
            q = q[None]
        d = self.faiss["images"].d
        if q.ndim != 2 or q.shape[1] != d:
            raise SearchIndexError(f"query vectors must be [n, {d}], got {list(q.shape)}")
        return q

    def _rows(self, sql: str, ids: list):
        out, con = [], self.con
        for s in range(0, len(ids), 500):
            part = ids[s:s + 500]
            out += con.execute(sql.format(",".join("?" * len(part))), part).fetchall()
        return out

    def _image_studies(self, ids: List[int]) -> Dict[int, str]:
        return dict(self._rows("SELECT id, study_id FROM images WHERE id IN ({})", ids))

    def _records(self, ranked, match: Optional[str] = None) -> List[dict]:
        studies = [s for s, _ in ranked]
        meta = {r[0]: r for r in self._rows(
            "SELECT study_id, patient_id, split, view, report, findings, impression FROM studies "
            "WHERE study_id IN ({})", studies)}
        imgs: Dict[str, list] = {}
        for r in self._rows("SELECT id, key, study_id, view, image_path FROM images WHERE study_id IN ({}) ORDER BY id",
                            studies):
            imgs.setdefault(r[2], []).append({"id": r[0], "key": r[1], "view": r[3], "image_path": r[4], "score": None})
        out = []
        for rank, (study, info) in enumerate(ranked, 1):
            _, patient, split, view, report, findings, impression = meta[study]
            hit_score = dict(info["hits"])
            images = imgs.get(study, [])
            for im in images:
                im["score"] = hit_score.get(im["id"])
            images.sort(key=lambda im: (im["score"] is None, -(im["score"] or 0.0), im["id"]))
            out.append({"rank": rank, "study_id": study, "score": float(info["score"]), "patient_id": patient,
                        "split": split, "view": view, "snippet": snippet(findings, impression, report),
                        "findings": findings, "impression": impression, "report": report,
                        "images": images[:IMAGES_PER_STUDY], "n_images": len(images),
                        "query_match": match is not None and study == match})
        return out

    def thumbnail(self, image_id: int) -> Optional[bytes]:
        row = self.con.execute("SELECT thumbnail FROM images WHERE id = ?", (int(image_id),)).fetchone()
        return row[0] if row else None
