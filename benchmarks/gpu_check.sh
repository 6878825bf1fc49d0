#!/usr/bin/env bash
# GPU check for the lent GPU machine (one H200 with torch and Triton; no DALI, no DeepSpeed, no network),
# sized for an 8-minute run: the stages' timeouts add up to at most 480 s. In order:
#
#   install        DeepSpeed and its missing dependencies from carried wheels ($WHEELS, made here by
#                  benchmarks/gpu_wheels.sh), then this package (editable, no dependencies, no index)
#   doctor         lcr-doctor: versions, the GPU, the kernels' start-up self-check on CUDA, data paths, 20 steps
#   kernel_tests   tests/test_kernel_*.py on CUDA (the ahead-of-time compile test runs on CPUs, not here)
#   gpu_paths      tests/test_cuda_paths.py: no synchronising CUDA call in BYOL's and MoCo's training steps
#                  (torch's sync debug mode), DeepSpeed binding device 0 for a local rank beyond the visible
#                  GPUs, CUDA RNG states of more GPUs than there are, --device made current, heatmaps on CUDA
#   kernel_bench   fused kernels against the eager torch compositions (benchmarks/kernel_bench.py)
#   step_bench     ours (bf16, channels_last) against the reference's fp32 eager step, batch 128, 224 px,
#                  through the trainer's own step (benchmarks/step_bench.py)
#   step_compile   ours again with engine.compile=default
#   e2e_bench      loader and step together, ours behind the torchvision loader (DALI is not there)
#
#     bash benchmarks/gpu_check.sh             # results under $OUT when set, else gpu_results/
#     bash benchmarks/gpu_check.sh --dry-run   # reach every stage, run none, print the timeouts' sum
#
# Without a GPU (or with CUDA_VISIBLE_DEVICES=) the GPU stages are reported as skipped. Each stage writes
# stages.json (every stage so far: status, exit code, wall and timeout seconds) and its own JSON as soon
# as it ends (gpu_paths writes none: its output is in the log); all output also goes to gpu_check.log. That is
# 8 files at most, what a run brings back. docs/gpu-readiness.md maps every CUDA-only branch to its stage.
# PYTHON picks the interpreter: .venv/bin/python where there is one, else python3 (the GPU image's torch).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY="$PYTHON"
RESULTS="${OUT:-gpu_results}"
WHEELS="${WHEELS:-.gpu_wheels}"
LOG="$RESULTS/gpu_check.log"
mkdir -p "$RESULTS"
: > "$LOG"

# Seconds per stage; the sum is the script's bound (kill-after adds 2 s per stage that ignores SIGTERM).
declare -A LIMIT=([install]=30 [doctor]=75 [kernel_tests]=80 [gpu_paths]=30 [kernel_bench]=45 [step_bench]=75
                  [step_compile]=85 [e2e_bench]=60)
BUDGET=480
TOTAL=0
for name in "${!LIMIT[@]}"; do TOTAL=$((TOTAL + LIMIT[$name])); done
if [ "$TOTAL" -gt "$BUDGET" ]; then
    echo "the stages' timeouts add up to ${TOTAL} s, over the ${BUDGET} s budget" >&2
    exit 2
fi

say() { echo "$*" | tee -a "$LOG"; }

GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
say "gpu_check: python $PY, GPU visible: $([ "$GPU" = 1 ] && echo yes || echo no), dry run: $([ "$DRY_RUN" = 1 ] \
    && echo yes || echo no); ${#LIMIT[@]} stages, timeouts sum to ${TOTAL} s (budget ${BUDGET} s)"
if [ "$GPU" = 1 ]; then nvidia-smi 2>&1 | tee -a "$LOG" > /dev/null; fi

RECORDS=()
STATUS=0
write_stages() {
    local IFS=,
    printf '{"gpu": %s, "dry_run": %s, "timeout_sum_s": %d, "stages": [%s]}\n' \
        "$([ "$GPU" = 1 ] && echo true || echo false)" "$([ "$DRY_RUN" = 1 ] && echo true || echo false)" \
        "$TOTAL" "${RECORDS[*]}" > "$RESULTS/stages.json"
}

# stage NAME NEEDS_GPU JSON_FILE COMMAND...: runs COMMAND under the stage's timeout (or skips it), records it.
stage() {
    local name=$1 needs_gpu=$2 json=$3
    shift 3
    local limit=${LIMIT[$name]} status reason="" rc=null wall=0
    say "== $name (timeout ${limit} s): $*"
    if [ "$DRY_RUN" = 1 ]; then
        status=skipped
        reason="dry run$([ "$needs_gpu" = 1 ] && [ "$GPU" = 0 ] && echo '; needs a GPU')"
    elif [ "$needs_gpu" = 1 ] && [ "$GPU" = 0 ]; then
        status=skipped reason="no GPU"
    else
        local start=$SECONDS
        timeout --kill-after=2 "$limit" "$@" 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        wall=$((SECONDS - start))
        case $rc in
            0) status=passed ;;
            124 | 137) status="timed out"; STATUS=1 ;;
            *) status=failed; STATUS=1 ;;
        esac
    fi
    say "-- $name: $status${reason:+ ($reason)}$([ "$rc" != null ] && [ -n "$json" ] && echo ", $RESULTS/$json")"
    local record='{"name": "%s", "status": "%s", "reason": "%s", "rc": %s, "wall_s": %d, "timeout_s": %d, "json": %s}'
    RECORDS+=("$(printf "$record" "$name" "$status" "$reason" "$rc" "$wall" "$limit" \
        "$([ -n "$json" ] && echo "\"$json\"" || echo null)")")
    write_stages
}

# The GPU image lacks DeepSpeed and reaches no index: install from the carried wheels. lcr_fast.kernels maps
# to kernels/ through setup.py's package_dir, hence an editable install (no dependencies, no build isolation).
install_packages() {
    set -e
    if ! "$PY" -c "import deepspeed" 2>/dev/null; then
        [ -d "$WHEELS" ] || { echo "no $WHEELS/: make it with benchmarks/gpu_wheels.sh and carry it"; exit 1; }
        "$PY" -m pip install --quiet --no-index --no-cache-dir --find-links "$WHEELS" deepspeed
    fi
    "$PY" -c "import lcr_fast.kernels" 2>/dev/null || "$PY" -m pip install --quiet --no-index --no-deps \
        --no-build-isolation -e .
    "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
}
export -f install_packages
export PY WHEELS
stage install 1 "" bash -c install_packages
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import lcr_fast.kernels" 2>/dev/null; then
    # The editable install failed: the package assembled in a temporary folder instead.
    shim="$(mktemp -d)"
    cp -r lcr_fast "$shim/lcr_fast"
    rm -rf "$shim/lcr_fast/kernels"
    ln -s "$PWD/kernels" "$shim/lcr_fast/kernels"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    say "lcr_fast imported through a PYTHONPATH shim ($shim)"
fi
"$PY" -c "import nvidia.dali" 2>/dev/null || say "DALI: not installed here (its wheel is too large to carry): \
lcr-doctor reports its paths as failed, and the end-to-end stage reads through the torchvision loader"

stage doctor 0 doctor.json "$PY" -m lcr_fast.doctor --json "$RESULTS/doctor.json"
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
KERNEL_TESTS=()
for f in tests/test_kernel_*.py; do [ "$f" = tests/test_kernel_compile.py ] || KERNEL_TESTS+=("$f"); done
stage kernel_tests 1 kernel_tests.xml "$PY" -m pytest "${KERNEL_TESTS[@]}" -q -p no:cacheprovider "${XDIST[@]}" \
    --junitxml="$RESULTS/kernel_tests.xml"
# Right after the kernel tests, whose launches leave Triton's cache warm for these.
stage gpu_paths 1 "" "$PY" -m pytest tests/test_cuda_paths.py -q -p no:cacheprovider -rs
stage kernel_bench 1 kernel_bench.json "$PY" benchmarks/kernel_bench.py --rep 25 --json "$RESULTS/kernel_bench.json"
stage step_bench 1 step_bench.json "$PY" benchmarks/step_bench.py --batch 128 --size 224 --precision bf16 \
    --steps 6 --warmup 2 --json "$RESULTS/step_bench.json"
stage step_compile 1 step_bench_compile.json "$PY" benchmarks/step_bench.py --batch 128 --size 224 \
    --precision bf16 --steps 5 --warmup 2 --compile default --no-reference --json "$RESULTS/step_bench_compile.json"
stage e2e_bench 1 e2e_bench.json "$PY" benchmarks/e2e_bench.py --arch resnet50 --batch 128 --size 224 \
    --precision bf16 --threads 16 --steps 3 --warmup 1 --json "$RESULTS/e2e_bench.json"

say "results in $RESULTS/ (status $STATUS); the stages' timeouts sum to ${TOTAL} s"
exit $STATUS
