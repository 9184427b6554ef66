"""Shard writing speed: real radiographs -> WebDataset shards, with 1 and 2 worker processes.

    .venv/bin/python bench/bench_shards.py [--n 400] [--workers 1 2] [--extra-images DIR]

Images: the 16 paediatric chest JPEGs (about 1000-1800 px) and the adult PA DICOM
(1955x1841, 15-bit), cycled to --n samples. Each image is decoded, reduced to --max-side
and re-encoded; the parent process writes the tars.
"""
import argparse
import tempfile
from pathlib import Path

from bench_common import Timer, machine, make_samples, print_table, real_images

from open_clip_cxr.data.encode import EncodeOptions
from open_clip_cxr.data.shard_writer import ShardLimits, write_shards


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="samples to write (default 400)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", nargs="+", default=["png", "jpg"])
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--extra-images", help="a folder of extra real PNGs to include (optional)")
    args = ap.parse_args()
    images = real_images(args.extra_images)
    samples = make_samples(args.n, images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            for workers in args.workers:
                out = Path(tmp) / f"{fmt}-{workers}"
                with Timer() as t:
                    m = write_shards(samples, out, options=EncodeOptions(max_side=args.max_side, image_format=fmt),
                                     limits=ShardLimits(samples_per_shard=100), workers=workers, progress=False)
                n = sum(s["samples"] for s in m["splits"].values())
                mb = sum(s["bytes"] for s in m["splits"].values()) / 1e6
                rows.append([fmt, workers, n, f"{t.seconds:.2f}", f"{n / t.seconds:.1f}",
                             f"{1000 * t.cpu / n:.1f}", f"{mb:.1f}"])
                # resume check: a rerun of the same command only verifies checksums
                with Timer() as t2:
                    write_shards(samples, out, options=EncodeOptions(max_side=args.max_side, image_format=fmt),
                                 limits=ShardLimits(samples_per_shard=100), workers=workers, progress=False)
                rows[-1].append(f"{t2.seconds:.2f}")
    print_table(f"shard writing: {len(images)} distinct real images cycled to {args.n} samples, "
                f"max side {args.max_side}; {machine()}",
                ["format", "workers", "images", "wall s", "images/s", "CPU ms/image", "MB written",
                 "rerun s (all reused)"], rows)


if __name__ == "__main__":
    main()
