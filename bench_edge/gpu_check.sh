#!/usr/bin/env bash
# The first GPU run, in one offline command: build the CUDA kernels, run the CUDA tests, then measure
# the copy kernel, offloaded decode, int4 decode and transformers' offloaded cache, in order of value, each part
# writing its JSON under $OUT as soon as it ends, within BUDGET seconds (a part that would not fit
# in what is left is skipped and says so).
#
#   bash bench_edge/gpu_check.sh --prepare            # here, with pip and a network: wheels into .whl/
#   BUDGET=480 bash bench_edge/gpu_check.sh           # there: a bare machine with one CUDA GPU, no network
#   DEVICE=cpu SHAPE=tiny bash bench_edge/gpu_check.sh    # the whole flow on a CPU (what CI runs)
#
# Environment: BUDGET (seconds, default 480), OUT (results folder; default bench_edge/results/gpu_check_DEVICE),
# DEVICE (cuda or cpu), SHAPE (llama-3.1-8b or tiny; tiny is the default with DEVICE=cpu), CONTEXT
# (tokens; 32768, or 512 for tiny), CUDA_ARCH (default 90, the H100/H200), PYTHON (default python3).
# The exit status is 0 only if the build, the kernel check and the CUDA tests passed and no part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=(cffi==2.0.0 pycparser==2.23 gguf==0.17.1)  # what a torch image lacks of specontext's core needs

if [ "${1:-}" = "--prepare" ]; then
    # Wheels for the device's Python (3.12, x86-64 manylinux) into the git-ignored .whl/; the device
    # call carries that folder. Their own dependencies (numpy, pyyaml, tqdm) are in a torch image.
    mkdir -p .whl
    exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi
if [ $# -gt 0 ]; then
    echo "gpu_check.sh: unknown argument '$1'; run with no argument (settings come from the environment) or --prepare" >&2
    exit 2
fi

BUDGET=${BUDGET:-480}
DEVICE=${DEVICE:-cuda}
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
if [ "$DEVICE" = cpu ]; then SHAPE=${SHAPE:-tiny}; else SHAPE=${SHAPE:-llama-3.1-8b}; fi
if [ "$SHAPE" = tiny ]; then CONTEXT=${CONTEXT:-512}; BENCH_BUDGET=256; else CONTEXT=${CONTEXT:-32768}; BENCH_BUDGET=2048; fi
CUDA_ARCH=${CUDA_ARCH:-90}
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/bench_edge/results/gpu_check_$DEVICE}
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: BUDGET must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
mkdir -p "$OUT"
LOG=$OUT/log.txt
WORK=$(mktemp -d)  # bookkeeping outside $OUT: the device call brings back at most 8 files
trap 'rm -rf "$WORK"' EXIT
PARTS=$WORK/parts.tsv
: > "$LOG"; : > "$PARTS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONFAULTHANDLER=1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
summary() { "$PY" bench_edge/gpu_check.py summary --out "$OUT" --parts "$PARTS" --budget "$BUDGET" --device "$DEVICE" \
                --shape "$SHAPE" --context "$CONTEXT" --compiled "$WORK/compiled.json" --int4 "$WORK/int4.json" >> "$LOG" 2>&1 \
                || say "summary failed (see log.txt)"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$PARTS"; summary; }

# run_part NAME SECONDS_NEEDED CMD...: skipped when less than SECONDS_NEEDED is left; killed at the budget.
FAILED=0
run_part() {
    local name=$1 need=$2 l t0 rc
    shift 2
    l=$(left)
    if [ "$l" -lt "$need" ]; then
        say "$name: skipped ($l s left, it needs about $need s)"
        record "$name" skipped 0 "$l s left, needs about $need s"
        return 0
    fi
    say "$name: running (at most $l s)"
    t0=$(date +%s)
    # SIGINT first, so Python prints where it was; SIGKILL 15 s later if it is still there
    timeout -s INT --kill-after=15 "$l" "$@" >> "$LOG" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        say "$name: ok in $took s"; record "$name" ok $took
    elif [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ $took -ge $(( l - 1 )) ]; }; then
        say "$name: stopped at the budget after $took s"; record "$name" timeout $took; FAILED=1
    elif [ $rc -eq 137 ]; then  # killed before the budget: the kernel's out-of-memory killer, most likely
        say "$name: KILLED after $took s (exit 137: out of host memory?)"; record "$name" failed $took "killed (exit 137)"; FAILED=1
    else
        say "$name: FAILED (exit $rc; see log.txt)"; record "$name" failed $(( $(date +%s) - t0 )) "exit $rc"; FAILED=1
    fi
    return $rc
}

say "device $DEVICE, shape $SHAPE, context $CONTEXT, budget $BUDGET s, results in $OUT"
{   # what a failure would need to be understood, in the log only
    echo "--- machine"; uname -a; nproc; free -g 2>/dev/null; ulimit -l
    cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.current 2>/dev/null
    command -v nvidia-smi > /dev/null && nvidia-smi
    command -v nvcc > /dev/null && nvcc --version | tail -2; cmake --version | head -1; gcc --version 2>/dev/null | head -1
    "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
    echo "---"
} >> "$LOG" 2>&1

# 1. Packages: wheels carried in .whl/ (no index is reachable on the device); the source tree is imported.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=/tmp/specontext-site
    if "$PY" -m pip --version > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl >> "$LOG" 2>&1 || say "pip could not install .whl/*.whl (see log.txt)"
    else  # no pip there: a wheel is a zip of the files to import
        for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" >> "$LOG" 2>&1 || say "cannot unpack $w"; done
    fi
    export PYTHONPATH=$SITE:$PYTHONPATH
    say "wheels: $(ls .whl | tr '\n' ' ')"
fi
if ! "$PY" -c "import torch, cffi, numpy, safetensors, tokenizers" >> "$LOG" 2>&1; then
    say "FATAL: torch, cffi, numpy, safetensors or tokenizers is missing; run 'bash bench_edge/gpu_check.sh --prepare' here and carry .whl"
    record packages failed 0 "a core package is missing"; exit 1
fi
record packages ok 0

# 2. The native library, from source, with the CUDA kernels required on a GPU (nvcc may not be on PATH).
BUILD=$REPO/build/gpu-check-$DEVICE
if [ "$DEVICE" = cuda ]; then
    if ! command -v nvcc > /dev/null; then
        for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do [ -x "$d/nvcc" ] && export PATH=$PATH:$d && break; done
    fi
    CMAKE_CUDA=(-DSPECONTEXT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH")
else
    CMAKE_CUDA=(-DSPECONTEXT_CUDA=OFF)
fi
GENERATOR=(); command -v ninja > /dev/null && GENERATOR=(-G Ninja)
say "build: $BUILD (${CMAKE_CUDA[*]})"
T0=$(date +%s)
if timeout "$(left)" cmake -S "$REPO" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release "${CMAKE_CUDA[@]}" >> "$LOG" 2>&1 \
        && timeout "$(left)" cmake --build "$BUILD" -j 8 >> "$LOG" 2>&1; then
    say "build: ok in $(( $(date +%s) - T0 )) s"; record build ok $(( $(date +%s) - T0 ))
else
    say "FATAL: the native library did not build (see log.txt)"; record build failed $(( $(date +%s) - T0 )); exit 1
fi
export SPECONTEXT_NATIVE_LIB=$BUILD/libspecontext_native.so
if ! run_part kernels_in_library 10 "$PY" bench_edge/gpu_check.py library --out "$OUT" --device "$DEVICE" --arch "$CUDA_ARCH"; then
    say "FATAL: the library has no usable CUDA kernels for sm_$CUDA_ARCH (see library.json and log.txt)"; exit 1
fi

# 3. Correctness on the device: every CUDA test (on a CPU they all skip; the run still checks collection).
run_part cuda_tests 60 "$PY" -m pytest -q -m cuda tests/ -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$WORK/tests.xml" -o junit_family=xunit1
"$PY" bench_edge/gpu_check.py tests --out "$OUT" --junit "$WORK/tests.xml" >> "$LOG" 2>&1

# 4-6. Measurements, each in its own process so one failure leaves the others standing.
BENCH=(bench_edge/bench_offload_gpu.py --device "$DEVICE" --shape "$SHAPE" --context "$CONTEXT" --budget "$BENCH_BUDGET")
if [ "$SHAPE" = tiny ]; then BENCH+=(--rows 64,512 --steps 8 --rounds 2); fi
run_part kernel 30 "$PY" "${BENCH[@]}" --part kernel --out "$OUT/kernel.json"
run_part decode 120 "$PY" "${BENCH[@]}" --part decode --out "$OUT/decode.json"
# int4 weights (the tensor-core kernel) against bfloat16, dense decode at 2k; in summary.json
if [ "$SHAPE" = tiny ]; then INT4=(--shape tiny --context 256 --chunk 128 --steps 8); else INT4=(--shape "$SHAPE" --context 2048 --steps 32); fi
run_part int4_decode 90 "$PY" bench_edge/bench_int4_gpu.py --device "$DEVICE" "${INT4[@]}" --out "$WORK/int4.json"
run_part transformers 120 "$PY" "${BENCH[@]}" --part transformers --out "$OUT/transformers.json"
# one request, 2 steps timed at each of the 5 output points: a first look that fits what is left
# (the planner's full request count at [2k, 32k] is gpu_suite.sh's, about 8 minutes on its own)
if [ "$SHAPE" = tiny ]; then E2E=(--shape tiny --setting 256,64 --requests 2); else E2E=(--shape "$SHAPE" --setting 2k,32k --requests 1 --steps-sampled 2); fi
run_part e2e 150 "$PY" bench_edge/bench_e2e.py gpu --device "$DEVICE" "${E2E[@]}" --out "$OUT/e2e.json"
# 7. The decode step eager and captured as CUDA graphs, tokens compared (a tiny 30-layer model: per-step
# overhead), which sets --compile-decode's default on a GPU; in summary.json (at most 8 files come back).
if [ "$DEVICE" = cuda ]; then MODES=off,cuda-graph; else MODES=off; fi
run_part compiled_decode 150 "$PY" bench_edge/bench_step_overhead.py --device "$DEVICE" --modes "$MODES" \
    --configs dense,specontext_sparse --steps 32 --repeats 2 --out "$WORK/compiled.json"

say "done in $(( $(date +%s) - START )) s of $BUDGET; summary: $OUT/summary.json"
summary
exit $FAILED
