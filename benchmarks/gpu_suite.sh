#!/usr/bin/env bash
# The train-step benchmark suite for one GPU, each run in its own process, whole suite <= BUDGET seconds.
#
#   bash benchmarks/gpu_suite.sh                 # ViT-B/32, batch 512, 10 timed steps after 2 warm-ups
#   BUDGET=420 MODEL=vitb32 BATCH=512 STEPS=10 WARMUP=2 PY=python3 BENCH_OUT=outputs/bench bash benchmarks/gpu_suite.sh
#   MODEL=tiny BATCH=8 STEPS=2 PLATFORM=cpu SKIP_COMPILE=1 bash benchmarks/gpu_suite.sh   # CPU dry run
#
# Order: jax bf16 (defaults), jax bf16 with one candidate each (cuDNN attention, tokens padded to an even
# length, the lengths in its log and the table; on PLATFORM=cpu the same padded program on XLA; scan over layers),
# torch eager bf16, torch.compile bf16, then, if time remains, jax tf32 and torch eager tf32.
# Each run gets min(its cap, time left - 5 s); a run that times out is reported and the suite goes on.
# The table of the runs so far is printed after every run; JSON lines go to $BENCH_OUT/train_step.jsonl and
# each run's log to $BENCH_OUT/<name>.log.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BUDGET=${BUDGET:-420}
MODEL=${MODEL:-vitb32}
BATCH=${BATCH:-512}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
PLATFORM=${PLATFORM:-gpu}
BENCH_OUT=${BENCH_OUT:-outputs/bench}
SKIP_COMPILE=${SKIP_COMPILE:-0}
mkdir -p "$BENCH_OUT"
RESULTS="$BENCH_OUT/train_step.jsonl"
rm -f "$RESULTS"
START=$(date +%s)
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$PLATFORM" = cpu ]; then export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""; fi

# run NAME CAP_SECONDS ARGS... : one benchmark process under a timeout, then the table so far
run() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    echo "[suite] skip $name: ${left}s left"
    return
  fi
  echo "[suite] $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$PY" benchmarks/train_step.py --platform "$PLATFORM" --model "$MODEL" --batch "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --name "$name" --out "$RESULTS" "$@" > "$BENCH_OUT/$name.log" 2>&1
  local rc=$?
  echo "[suite] $name exit $rc after $(( $(date +%s) - t0 ))s (total $(( $(date +%s) - START ))s)"
  if [ $rc -ne 0 ]; then tail -n 15 "$BENCH_OUT/$name.log"; fi
  "$PY" benchmarks/train_step.py --report "$RESULTS"
  echo
}

run jax_bf16          110 --side jax --precision bf16
if [ "$PLATFORM" = cpu ]; then  # cuDNN needs a GPU: run its padded program with XLA's attention instead
  echo "[suite] PLATFORM=cpu: jax_bf16_cudnn runs as jax_bf16_padded_xla (attention=xla_padded, same padded program)"
  run jax_bf16_padded_xla 100 --side jax --precision bf16 --attention xla_padded
else
  run jax_bf16_cudnn    100 --side jax --precision bf16 --attention cudnn
fi
run jax_bf16_scan      90 --side jax --precision bf16 --scan
run torch_eager_bf16   60 --side torch --precision bf16
if [ "$SKIP_COMPILE" != 1 ]; then
  run torch_compile_bf16 150 --side torch_compile --precision bf16
fi
run jax_tf32          100 --side jax --precision tf32
run torch_eager_tf32   60 --side torch --precision tf32
echo "[suite] done in $(( $(date +%s) - START ))s; JSON lines in $RESULTS"
