"""A static HTML page to eyeball retrieval: image queries with their top-3 reports and the true
report, and report queries with their top-3 images. Correct hits are framed in green.

Thumbnails are PNG files copied into the output folder, so the page works offline and can be
zipped. Every text and id is HTML-escaped. Usage: `plan_gallery` picks the queries and says
which images are needed; `collect_thumbnails` reads just those from the shards; `write_gallery`.
"""
import hashlib
import html
import os
import random
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

THUMB_SIDE = 256

_CSS = """body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}
.q{display:flex;gap:1em;align-items:flex-start;background:#fff;border:1px solid #ddd;padding:.8em;margin:.8em 0}
.cell{flex:1;min-width:0;font-size:.85em}.cell p{white-space:pre-wrap;margin:.3em 0}
.hit{outline:3px solid #2a2;outline-offset:2px}.true{background:#eef7ee}
img{max-width:220px;max-height:220px;display:block}.meta{color:#666;font-size:.8em}"""


def plan_gallery(n_images: int, n_texts: int, image_keys: Sequence[str], t2i_indices: torch.Tensor,
                 n_image_queries: int = 12, n_text_queries: int = 8, seed: int = 0,
                 top: int = 3) -> Tuple[List[int], List[int], Set[str]]:
    """(image query rows, text query rows, image keys whose thumbnails the page needs)."""
    rng = random.Random(seed)
    iq = sorted(rng.sample(range(n_images), min(n_image_queries, n_images)))
    tq = sorted(rng.sample(range(n_texts), min(n_text_queries, n_texts)))
    keys = {image_keys[i] for i in iq}
    for t in tq:
        keys.update(image_keys[int(j)] for j in t2i_indices[t, :top] if int(j) >= 0)
    return iq, tq, keys


def _thumb(img):
    """A small RGB PIL image from a PIL image or a [C, H, W] / [H, W] tensor (min-max scaled)."""
    from PIL import Image
    if isinstance(img, torch.Tensor):
        x = img.detach().float().cpu()
        x = x if x.dim() == 3 else x[None]
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
        x = (x * 255).round().byte()
        arr = x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()
        img = Image.fromarray(arr)
    elif isinstance(img, (str, os.PathLike)):
        img = Image.open(img)
    img = img.convert("RGB")
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return img


def collect_thumbnails(urls, keys: Iterable[str], num_workers: int = 0) -> Dict[str, object]:
    """Read the images `keys` from the shards (one pass), as small PIL thumbnails."""
    from open_clip_cxr.data.loader import SampleSource
    wanted = set(keys)
    out: Dict[str, object] = {}
    if not wanted:
        return out
    src = SampleSource(urls, preprocess=_thumb, num_workers=num_workers)
    for key, _study, image, _text, _meta in src:
        if key in wanted:
            out[key] = image
            if len(out) == len(wanted):
                break
    return out


def _save(out_dir: str, key: str, images: Mapping, saved: Dict[str, Optional[str]]) -> Optional[str]:
    if key not in saved:
        if key not in images:
            saved[key] = None
        else:
            name = "img/" + hashlib.sha1(key.encode()).hexdigest()[:16] + ".png"   # keys may hold any character
            _thumb(images[key]).save(os.path.join(out_dir, name))
            saved[key] = name
    return saved[key]


def _img_tag(src: Optional[str], alt: str, hit: bool) -> str:
    cls = ' class="hit"' if hit else ""
    if src is None:
        return f'<div class="meta">(no thumbnail: {html.escape(alt)})</div>'
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{cls}>'


def write_gallery(out_dir: str, *, image_keys: Sequence[str], image_study_ids: Sequence[str],
                  text_study_ids: Sequence[str], texts: Sequence[str], i2t_indices: torch.Tensor,
                  t2i_indices: torch.Tensor, images: Mapping[str, object], image_queries: Sequence[int],
                  text_queries: Sequence[int], top: int = 3, title: str = "CXR retrieval gallery") -> str:
    """Write out_dir/index.html (+ out_dir/img/*.png); returns the page's path."""
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    saved: Dict[str, Optional[str]] = {}
    study_row = {s: i for i, s in enumerate(text_study_ids)}
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>",
             "<p class='meta'>Green frame: the retrieved item belongs to the query's study.</p>",
             f"<h2>Image &rarr; report (top {top})</h2>"]
    for i in image_queries:
        key, study = image_keys[i], image_study_ids[i]
        src = _save(out_dir, key, images, saved)
        cells = [f"<div class='cell'>{_img_tag(src, key, False)}<div class='meta'>{esc(key)}<br>study {esc(study)}</div></div>"]
        for rank, j in enumerate(i2t_indices[i, :top].tolist(), 1):
            if j < 0:
                continue
            hit = text_study_ids[j] == study
            cells.append(f"<div class='cell{' hit' if hit else ''}'><b>#{rank}</b> <span class='meta'>study "
                         f"{esc(str(text_study_ids[j]))}</span><p>{esc(texts[j])}</p></div>")
        true = study_row.get(study)
        if true is not None:
            cells.append(f"<div class='cell true'><b>true report</b><p>{esc(texts[true])}</p></div>")
        parts.append("<div class='q'>" + "".join(cells) + "</div>")
    parts.append(f"<h2>Report &rarr; image (top {top})</h2>")
    for t in text_queries:
        study = text_study_ids[t]
        cells = [f"<div class='cell'><b>query</b> <span class='meta'>study {esc(str(study))}</span><p>{esc(texts[t])}</p></div>"]
        for rank, j in enumerate(t2i_indices[t, :top].tolist(), 1):
            if j < 0:
                continue
            key = image_keys[j]
            hit = image_study_ids[j] == study
            src = _save(out_dir, key, images, saved)
            cells.append(f"<div class='cell'><b>#{rank}</b>{_img_tag(src, key, hit)}<div class='meta'>"
                         f"{esc(key)}<br>study {esc(str(image_study_ids[j]))}</div></div>")
        parts.append("<div class='q'>" + "".join(cells) + "</div>")
    parts.append("</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
