"""The demo's last step: index its held-out films and reports, then run one text and one image query."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

TEXT_QUERY = "Patchy airspace opacities consistent with pneumonia."


def index_and_query(out, model: Optional[str] = None, k: int = 3, split: str = "test") -> dict:
    """Build OUT/index from the `split` shards in OUT/shards with the exported model, print two queries' top-k.

    `model` defaults to the demo's export (`local-dir:OUT/export`). The image query is the first
    held-out film listed in OUT/images.csv, so its own study is flagged in the results.
    """
    import open_clip_cxr
    from open_clip_cxr.data.manifest import shard_urls
    from open_clip_cxr.search.build import build_index, shard_sources
    from open_clip_cxr.search.cli_search import format_results
    from open_clip_cxr.search.index import Index
    out = Path(out)
    print(f"\n=== search: index the held-out ({split}) films and reports ===", flush=True)
    name = model or f"local-dir:{out / 'export'}"
    net, _, preprocess = open_clip_cxr.create_model_and_transforms(name)
    triple = (net.eval(), preprocess, open_clip_cxr.get_tokenizer(name))
    folder = out / "index"
    # overwrite: a rerun of the demo may have retrained the model; the index is rebuilt in seconds
    build_index(folder, shard_sources(shard_urls(out / "shards", split)), model=triple[0], preprocess=preprocess,
                tokenizer=triple[2], model_name=name, overwrite=True, chunk_size=64, progress=False)
    index = Index.open(folder, model=triple)
    with open(out / "images.csv", newline="") as f:
        film = next(r["image"] for r in csv.DictReader(f) if r["split"] == split)
    text_hits = index.search_text(TEXT_QUERY, k=k)
    image_hits = index.search_image(film, k=k)
    print(format_results(f"text {TEXT_QUERY!r}", text_hits))
    print(format_results(f"image {film}", image_hits))
    print(f"(search it yourself: open-clip-cxr search --index {folder} --text \"...\"; "
          f"or open-clip-cxr serve --index {folder})")
    index.close()
    return {"index": str(folder), "text": text_hits, "image": image_hits}
