#!/usr/bin/env bash
# GPU backend check on a lent CUDA machine: benchmarks, GPU tests, per-kernel profile, Nsight Compute counters
# of three kernels; results go to $OUT.
# Every step runs even when an earlier one fails; $OUT/summary.txt lists each step's exit code. The step
# limits are upper bounds; on an H100 the whole script takes about 3-4 minutes (see bench/RESULTS.md).
#
#   device run (from the repo root, carry: [".whl"]):   bash bench/gpu_run.sh [bench args...]
#
# .whl/ holds pure-Python wheels the device image lacks (gguf, for the tests' reference decoders):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl gguf==0.19.0
set -x
OUT=${OUT:-/tmp/hybridllm-gpu-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
: > "$OUT/summary.txt"

step() {  # step NAME TIMEOUT_S CMD...: output to $OUT/NAME.log, exit code to the summary
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/$name.log"
    return 0
}

# only gguf: the image's own pytest (with pytest-xdist) stays in charge
if ls .whl/gguf-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/hybridllm-site .whl/gguf-*.whl \
        && export PYTHONPATH=/tmp/hybridllm-site${PYTHONPATH:+:$PYTHONPATH}
fi
XDIST=""
python3 -c "import xdist" 2> /dev/null && XDIST="-n 4"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export HYBRIDLLM_CACHE_DIR=/tmp/hybridllm-cache
export HYBRIDLLM_GPU_EMU=""   # real device only; the emulator variants run in CI

step env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv;
python3 -c "import sys, numpy, cupy; print(sys.version); print(\"numpy\", numpy.__version__, \"cupy\", cupy.__version__)"'

# First start compiles every kernel module (NVRTC) into the cache; the second must only load it.
step kernels_cold 120 python3 -c "
import time
from hybridllm.backends.cupy_backend import CupyRuntime
t = time.perf_counter(); CupyRuntime(0).kernels.preload()
print('compile+load s', round(time.perf_counter() - t, 2))"
step kernels_warm 30 python3 -c "
import time
from hybridllm.backends.cupy_backend import CupyRuntime
t = time.perf_counter(); CupyRuntime(0).kernels.preload()
print('cached load s', round(time.perf_counter() - t, 2))"

step bench_gpu 150 python3 bench/bench_gpu.py --json "$OUT/bench_gpu.json" "$@"

# (the worker conformance test needs the llama.cpp peer wheel, which the device image lacks)
step tests_gpu 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" $XDIST -rs --junitxml="$OUT/tests_gpu.xml" \
    --ignore=tests/gpu/test_gpu_worker_conformance.py tests/gpu

step profile 90 python3 bench/gpu_profile.py --models qwen3-0.6b-q8_0,qwen3-8b-q4_k_m,qwen3-30b-a3b-q5_k_m \
    --prefill 512 --fa --json "$OUT/profile.json"

# hardware counters of one launch each of the decode attention, the decode GLU matvec and a prefill tile kernel
if command -v ncu > /dev/null; then
    for k in k_fa_128_1_8 mmvq_glu_q4_K mul_mat_mma64_q4_K; do
        step "ncu_$k" 60 ncu -k "regex:^$k\$" -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
            --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
            python3 bench/gpu_profile.py --no-matvec --no-ablation --models qwen3-8b-q4_k_m --prefill 512 --reps 1
    done
fi

cat "$OUT/summary.txt"
exit 0
