#!/usr/bin/env bash
# medjax vs PyTorch in bf16 on one lent NVIDIA H100/H200-class GPU (issue 16), one run of < 8 min.
#
#   bash benchmarks/gpu.sh                  # from the repo root; results in ${OUT:-/tmp/gpu_out}
#   GPU_SH_SMOKE=1 bash benchmarks/gpu.sh   # the same sections on tiny models (checks it on a CPU)
#
# Prints nvidia-smi's one-line view, the versions and the devices, then runs, in order of
# importance, each section under its own `timeout` (its cap, or what is left of the budget):
#   (a) U-Net forward and gradient step at the SD1.5 shape (512 px -> 64x64 latents, batch 8),
#       medjax vs diffusers (PyTorch SDPA attention): benchmarks/unet.py
#   (b) medjax.train's step, U-Net fine-tune of an SD1.5-sized random pipeline at 512 px, batch 8,
#       vs diffusers' train_text_to_image step: images/s and MFU (FLOPs from XLA's cost analysis
#       of the compiled step, and of the step lowered on XLA:CPU; peak 989.4 TFLOP/s dense bf16,
#       and a measured bf16 matmul): benchmarks/train_step.py
#   (c) 50-step DDIM sampling with guidance 7.5, 512 px, batch 8, vs diffusers'
#       StableDiffusionPipeline: benchmarks/sample.py
#   (d) benchmarks/attention.py, when the file exists
#   (e) the U-Net forward under torch.compile (the issue's "forward <= 1.0x torch.compile"), if
#       the budget still allows it (its compile alone takes about a minute)
# and ends with one summary table: medjax / PyTorch ratios of time and of peak device memory.
# Everything printed is also appended to $OUT/gpu_log.txt; results as JSON in $OUT (unet.json,
# train_step.json, sample.json, unet_compile.json; attention.txt): six files at most, as the
# device tool brings back eight. The SD1.5-sized random pipeline (4.1 GB) is written once, on the
# CPU, in the background while (a) runs, and read by (b) and (c).
#
# Budget: GPU_SH_BUDGET seconds in all (default 480); a section that would start with less
# than its minimum left is skipped, so the summary always prints. On an H200 the expected times
# are about: header 15 s, (a) 160 s, (b) 145 s, (c) 100 s, (d) 60 s, (e) 90 s (most of it JAX's
# and torch.compile's compiles); see the README's benchmark section for measured ones.
# Wheels in .whl/ (carried to a machine without a package index) are installed first, only
# those whose package the machine lacks (benchmarks/gpu_report.py install), into /tmp/site.
# Other knobs: GPU_SH_ONLY=a,b,c,d,e (the sections to run); GPU_SH_TI=1 adds textual inversion
# (ti8) to (b); GPU_SH_PIPELINE (the pipeline's folder); GPU_SH_WHEELS, GPU_SH_SITE, GPU_SH_WORK;
# PYTHON (default python3); XLA_FLAGS reaches JAX's workers.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT" || exit 1
LOG="$OUT/gpu_log.txt"
WORK="${GPU_SH_WORK:-/tmp/gpu_sh_work}"  # scratch that does not come back (the device tool
mkdir -p "$WORK" || exit 1                # returns at most 8 files from $OUT)
: >"$WORK/sections.txt"
rm -f "$OUT"/{unet,unet_compile,train_step,sample}.json "$OUT/attention.txt"  # this run's only
PY="${PYTHON:-python3}"
SMOKE="${GPU_SH_SMOKE:-0}"
WHEELS="${GPU_SH_WHEELS:-.whl}"
SITE="${GPU_SH_SITE:-/tmp/site}"
export PYTHONUNBUFFERED=1
# A second run on the same (still warm) machine skips JAX's compiles (torch.compile's cache in
# /tmp is its default); the compile seconds printed are then cache loads.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_sh_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}"
START=$SECONDS

log() { echo "$*" | tee -a "$LOG"; }

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" benchmarks/gpu_report.py install "$WHEELS" "$SITE" 2>&1 | tee -a "$LOG"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$SMOKE" = 1 ]; then
  BUDGET="${GPU_SH_BUDGET:-3600}"
  PIPE="${GPU_SH_PIPELINE:-$WORK/pipeline_tiny}"
  CONFIG=tiny BATCH=1
  UNET="--repeats=1" TRAIN="--warmup=1 --repeats=2" SAMPLE="--steps=3 --repeats=1"
  ATTN="--cases=mid --repeats=2"
  CAP_A=900 CAP_B=900 CAP_C=600 CAP_D=300 CAP_E=600 SIDE_TIMEOUT=600
else
  BUDGET="${GPU_SH_BUDGET:-480}"
  PIPE="${GPU_SH_PIPELINE:-/tmp/medjax_bench_sd15}"
  CONFIG=sd15 BATCH=8
  UNET="--repeats=5" TRAIN="--warmup=2 --repeats=5" SAMPLE="--steps=50 --repeats=2"
  ATTN="--cases=t1024,sd15,sd15_cross,vae512 --repeats=10"
  CAP_A=240 CAP_B=210 CAP_C=150 CAP_D=90 CAP_E=150 SIDE_TIMEOUT=150
fi
ONLY="${GPU_SH_ONLY:-a,b,c,d,e}"  # sections to run, e.g. GPU_SH_ONLY=c,e for a second call
KINDS=ft
[ "${GPU_SH_TI:-0}" = 1 ] && KINDS=ft,ti8
RESERVE=15  # seconds kept for the summary

# section NAME CAP MIN CMD...: runs CMD under `timeout` (CAP, or what the budget has left),
# appending its output to the log; skipped when less than MIN seconds are left.
section() {
  local name=$1 cap=$2 min=$3
  shift 3
  case ",$ONLY," in
    *",${name:1:1},"*) ;;
    *) log "== $name: not in GPU_SH_ONLY=$ONLY"; return ;;
  esac
  local left=$((BUDGET - RESERVE - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt "$min" ]; then
    log "== $name: skipped ($left s of the budget left, needs $min s)"
    echo "$name skipped 0" >>"$WORK/sections.txt"
    return
  fi
  log ""
  log "== $name [timeout ${limit}s, at $((SECONDS - START))s]: $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && log "== $name: TIMEOUT after ${limit}s"
  log "== $name: exit $rc in $((SECONDS - t0))s"
  echo "$name $rc $((SECONDS - t0))" >>"$WORK/sections.txt"
}

log "== medjax gpu.sh $(date -u +%FT%TZ) smoke=$SMOKE budget=${BUDGET}s out=$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv,noheader 2>&1 | tee -a "$LOG"
else
  log "nvidia-smi: not found"
fi
REV=$(git rev-parse --short HEAD 2>/dev/null || echo "- (no .git)")
log "load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null), git $REV"
timeout 60 "$PY" benchmarks/gpu_report.py env 2>&1 | tee -a "$LOG"

# The shared random pipeline, written on the CPU (4 threads) while (a) uses the GPU.
WRITER=
if [[ ",$ONLY," == *,[bc],* ]]; then
  (JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 timeout 240 nice -n 10 \
    "$PY" benchmarks/train_step.py --configs=$CONFIG --write_only --pipeline_dir="$PIPE" \
    >"$WORK/pipeline_log.txt" 2>&1; echo "pipeline writer: exit $?" >>"$WORK/pipeline_log.txt") &
  WRITER=$!
fi

section "(a) unet" "$CAP_A" 60 "$PY" benchmarks/unet.py --configs=$CONFIG --modes=forward,grad \
  --batch=$BATCH --bf16 $UNET --timeout=$SIDE_TIMEOUT --json="$OUT/unet.json"

if [ -n "$WRITER" ]; then
  wait "$WRITER"
  tail -n 3 "$WORK/pipeline_log.txt" | tee -a "$LOG"
fi
section "(b) train_step" "$CAP_B" 90 "$PY" benchmarks/train_step.py --configs=$CONFIG \
  --kinds=$KINDS --bf16 --batch=$BATCH $TRAIN --matmul_peak --model_flops \
  --pipeline_dir="$PIPE" --timeout=$((SIDE_TIMEOUT + 30)) --json="$OUT/train_step.json"

section "(c) sample" "$CAP_C" 60 "$PY" benchmarks/sample.py --configs=$CONFIG --bf16 \
  --batch=$BATCH --resolution=512 $SAMPLE --pipeline_dir="$PIPE" --timeout=$SIDE_TIMEOUT \
  --json="$OUT/sample.json"

if [ -f benchmarks/attention.py ]; then
  section "(d) attention" "$CAP_D" 30 bash -c "set -o pipefail; \"$PY\" benchmarks/attention.py \
    $ATTN --dtype=bf16 --modes=forward,backward | tee \"$OUT/attention.txt\""
else
  log "== (d) attention: benchmarks/attention.py not found, skipped"
fi

section "(e) unet torch.compile" "$CAP_E" 80 "$PY" benchmarks/unet.py --configs=$CONFIG \
  --modes=forward --batch=$BATCH --bf16 $UNET --sides=torch_compile \
  --json="$OUT/unet_compile.json"

log ""
log "== summary ($((SECONDS - START)) s in all)"
"$PY" benchmarks/gpu_report.py summary "$OUT" "$WORK/sections.txt" 2>&1 | tee -a "$LOG"
