"""Loading speed: our WebDataset loader vs a plain folder-of-PNGs Dataset, same images and transform.

    .venv/bin/python bench/bench_loader.py [--n 400] [--workers 0 2] [--extra-images DIR]

Both sides read the same real radiographs (16 paediatric JPEGs + the adult DICOM, cycled to
--n) and apply the same `cxr_transform(224)`. The folder holds the ORIGINAL full-size images
as PNG (what a folder dataset usually stores); the shards hold them pre-reduced to
--shard-side (256) by `write_shards`. Each row times one epoch after a warm-up epoch.
"""
import argparse
import tempfile
from pathlib import Path

import torch
from bench_common import Timer, machine, make_samples, print_table, real_images

from open_clip_cxr.data.encode import EncodeOptions
from open_clip_cxr.data.loader import make_loader
from open_clip_cxr.data.shard_writer import ShardLimits, write_shards
from open_clip_cxr.vision.io import load_image

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def transform():
    try:
        from open_clip_cxr.vision.transforms import cxr_transform
        return cxr_transform(224, MEAN, STD, train=False)
    except ImportError:  # before the vision transforms existed
        from torchvision import transforms as T
        return T.Compose([T.Resize(224), T.CenterCrop(224), T.Grayscale(3), T.ToTensor(), T.Normalize(MEAN, STD)])


class PngFolder(torch.utils.data.Dataset):
    """The baseline: one full-size PNG per item, decoded and transformed on access."""

    def __init__(self, files, texts, tf):
        self.files, self.texts, self.tf = files, texts, tf

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.tf(load_image(self.files[i], mode="L")), self.texts[i]


def _epoch(loader) -> int:
    return sum(len(batch[0]) for batch in loader)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-side", type=int, default=256)
    ap.add_argument("--extra-images", help="a folder of extra real PNGs to include (optional)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = real_images(args.extra_images)
    samples = make_samples(args.n, images)
    tf = transform()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "png"
        folder.mkdir()
        originals = []
        for i, p in enumerate(images):  # full-size 8-bit PNGs of the originals
            dst = folder / f"{i:04d}.png"
            load_image(p, mode="L").save(dst)
            originals.append(dst)
        files = [str(originals[i % len(originals)]) for i in range(args.n)]
        texts = [s.report.text for s in samples]
        m = write_shards(samples, Path(tmp) / "shards", options=EncodeOptions(max_side=args.shard_side),
                         limits=ShardLimits(samples_per_shard=50), workers=2, progress=False)
        urls = sorted(str(Path(tmp) / "shards" / n) for n in m["shards"])
        folder_mb = sum(f.stat().st_size for f in originals) / len(originals) * args.n / 1e6
        shard_mb = sum(e["bytes"] for e in m["shards"].values()) / 1e6
        for workers in args.workers:
            kw = dict(num_workers=workers, persistent_workers=workers > 0)
            candidates = {
                "png folder (full size)": torch.utils.data.DataLoader(
                    PngFolder(files, texts, tf), batch_size=args.batch_size, shuffle=True, **kw),
                "shards, eval loader": make_loader(urls, preprocess=tf, tokenizer=None, batch_size=args.batch_size,
                                                   train=False, num_workers=workers),
                "shards, train loader": make_loader(urls, preprocess=tf, tokenizer=None,
                                                    batch_size=args.batch_size, train=True, num_workers=workers,
                                                    epoch_samples=args.n, shuffle_buffer=200),
            }
            base = None
            for name, loader in candidates.items():
                _epoch(loader)  # warm-up: page cache, worker start
                with Timer() as t:
                    n = _epoch(loader)
                rate = n / t.seconds
                base = base or rate
                rows.append([name, workers, n, f"{t.seconds:.2f}", f"{rate:.1f}", f"{1000 * t.cpu / n:.1f}" if workers == 0 else "-",
                             f"{rate / base:.2f}x"])
    print_table(f"loading {args.n} images -> 224 px tensors, batch {args.batch_size}; folder {folder_mb:.0f} MB of "
                f"full-size PNG vs shards {shard_mb:.0f} MB (max side {args.shard_side}); {machine()}",
                ["loader", "workers", "images", "wall s", "images/s", "CPU ms/image (main)", "vs folder"], rows)


if __name__ == "__main__":
    main()
