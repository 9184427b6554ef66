"""Search your own archive: a persistent FAISS + SQLite index of images and reports.

    open-clip-cxr index --model M --pretrained CKPT --shards 'shards/test-{000000..000009}.tar' --out idx
    open-clip-cxr search --index idx --text "left lower lobe consolidation with effusion"
    open-clip-cxr serve --index idx

    from open_clip_cxr.search import Index
    Index.open("idx").search_text(["right pleural effusion"], k=10)

Modules: `store` (the folder's files), `build` (chunked, resumable encoding), `index` (the
query API), `cli` (the `index` and `search` commands), `serve` (the web page), `demo`.
"""
from open_clip_cxr.search.store import SearchIndexError


def __getattr__(name):
    # Index and build_index import torch and faiss: only when asked for
    if name == "Index":
        from open_clip_cxr.search.index import Index
        return Index
    if name == "build_index":
        from open_clip_cxr.search.build import build_index
        return build_index
    raise AttributeError(name)


__all__ = ["Index", "build_index", "SearchIndexError"]
