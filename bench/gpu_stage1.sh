#!/usr/bin/env bash
# Issue 19's stage-1 sweep on one lent GPU: several runs of the rewrites recipe at once (each its own
# process, `train.cpu=false`, bf16), each measured right after by bench_text_stage.py on the GPU
# (`--heldout-styles --both`, no baseline columns). What a CPU core does in ~35 min a GPU does in ~1.
#
# The device machine reaches nothing: build what it needs here first, then carry `.gpu`:
#   python bench/gpu_stage1_assets.py --llm-variants RUN/work/llm_variants --check
#   bash bench/gpu_stage1.sh NAME "--set k=v ..." [NAME "--set ..." ...]      (on the device)
# A run is a name and its recipe overrides (one string; "" for the recipe as it is). Each run prints its
# row (held-out mean, hospital style, ..., held-out discrimination, wall) when it ends; its logs and
# bench JSON go into one archive, $OUT/stage1_sweep.tar (the device returns at most 8 files).
# PY=.venv/bin/python and OUT=runs/gpu run it on a CPU too (slowly; LIMIT=40 benches 40 reports: for
# checking the script).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=$(realpath -m "${OUT:-runs/gpu_out}")
RECIPE=${RECIPE:-training/recipes/text-cxr-llm-small-cpu-rewrites.yaml}
THREADS=${THREADS:-2}
DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
[ -d .gpu/wheels ] || { echo "error: no .gpu/ (python bench/gpu_stage1_assets.py --llm-variants ...)"; exit 2; }
(( $# % 2 == 0 && $# > 0 )) || { echo "error: give NAME \"OVERRIDES\" pairs"; exit 2; }

work=$(mktemp -d)
# Each run's files are appended to one uncompressed archive as soon as it ends, so a `timeout` or a
# lost machine keeps every finished run; the end prints where each unfinished run got to.
archive() {   # archive NAME...: the files of $work/res whose names start with NAME
  (cd "$work/res" && shopt -s nullglob && set -- $(printf '%s* ' "$@") && (( $# )) || exit 0
   if command -v flock >/dev/null; then flock "$work/lock" tar -rf "$OUT/stage1_sweep.tar" "$@"
   else tar -rf "$OUT/stage1_sweep.tar" "$@"; fi)
}
finish() {
  for f in "$work"/res/*.train.log; do
    [ -f "$f" ] && [ ! -f "${f%.train.log}.bench.json" ] && \
      echo "unfinished $(basename "$f"): $(grep -ao 'cached [0-9]* texts.* s:' "$f" | tail -1) $(grep -a '^iter' "$f" | tail -1)"
  done
  rm -rf "$work"
}
trap finish EXIT
trap 'exit 143' TERM
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .gpu/wheels/*.whl || exit 1
# the sliced SmolLM2 and the Open-I tgz come first on the path (.gpu/site), then the wheels
# (the runs fill one dequantised-weights cache at once: each writes its own temporary file, cache.process_tmp)
export PYTHONPATH=$PWD/.gpu/site:$work/site HF_HUB_OFFLINE=1 OPEN_CLIP_CXR_CACHE=$work/cache
# bf16 as on the CPUs the other rounds ran on; also the precision the LLM-rewrite cache is keyed by
export OPEN_CLIP_CXR_PRECISION=bf16
mkdir -p "$OUT" "$work/res"
echo "device $DEVICE: $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
rm -f "$OUT/stage1_sweep.tar"

run_one() { run_steps "$1" "$2"; local rc=$?; archive "$1."; return $rc; }

run_steps() {
  local name=$1 sets=$2 d=$work/runs/$1 start
  mkdir -p "$d/work" && cp -r .gpu/llm_variants "$d/work/"
  start=$(date +%s)
  # shellcheck disable=SC2086  (the overrides are words)
  OMP_NUM_THREADS=$THREADS $PY -m open_clip_cxr.cli train-text --recipe "$RECIPE" --output-dir "$d" \
      --set eval.enabled=false --set train.cpu=$([ "$DEVICE" = cuda ] && echo false || echo true) \
      --set train.num_threads=$THREADS $sets > "$work/res/$name.train.log" 2>&1 \
    || { echo "$name: training failed"; tail -3 "$work/res/$name.train.log"; return 1; }
  echo $(( $(date +%s) - start )) > "$work/res/$name.wall"
  OMP_NUM_THREADS=$THREADS $PY bench/bench_text_stage.py --after "$d" --heldout-styles --both --columns "" ${LIMIT:+--limit $LIMIT} \
      --device "$DEVICE" --threads "$THREADS" --json "$work/res/$name.bench.json" > "$work/res/$name.bench.log" 2>&1 \
    || { echo "$name: bench failed"; tail -3 "$work/res/$name.bench.log"; return 1; }
  echo "$name: done in $(( $(date +%s) - start )) s"
  $PY bench/gpu_stage1_summary.py "$work/res" "$name" | tail -1
}

t0=$(date +%s)
while (( $# )); do run_one "$1" "$2" & shift 2; done
wait
echo "all runs: $(( $(date +%s) - t0 )) s"
$PY bench/gpu_stage1_summary.py "$work/res" | tee "$work/res/summary.tsv"
archive summary.tsv
