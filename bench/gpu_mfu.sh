#!/usr/bin/env bash
# Issue 5's GPU check as one short run (~4 min on one H200): the eager CLIP step of `cxr-llm`
# with a profile of where its time goes, then the compiled step with the frozen text base in bf16.
# Results: printed, and JSON + the profile table under $OUT when it is set.
#
# The device image has torch, timm, transformers, peft and accelerate but not OpenCLIP and a few
# pure-Python packages. Fetch their wheels here first (into the git-ignored .whl/):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy wcwidth webdataset braceexpand pydicom
# and run with `.whl` carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#       && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 bash bench/gpu_mfu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 bench/gpu_cxr_llm.py --batch 32 --grad-ckpt off --steps 10 --budget-s 60 --profile 3
python3 bench/gpu_cxr_llm.py --batch 32 --grad-ckpt off --compile --frozen-bf16 --budget-s 90
python3 bench/gpu_cxr_llm.py --batch 64 --grad-ckpt off --compile --frozen-bf16 --steps 15 --budget-s 40
