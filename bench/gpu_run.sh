#!/usr/bin/env bash
# GPU backend check on a lent CUDA machine: GPU tests, then benchmarks; results go to $OUT.
# Every step runs even when an earlier one fails; $OUT/summary.txt lists each step's exit code.
#
#   device run (from the repo root, carry: [".whl"]):   bash bench/gpu_run.sh
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

if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/hybridllm-site .whl/*.whl \
        && export PYTHONPATH=/tmp/hybridllm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HYBRIDLLM_CACHE_DIR=/tmp/hybridllm-cache
export HYBRIDLLM_GPU_EMU=""   # real device only; the emulator variants run in CI

step env 30 bash -c 'nvidia-smi; nvcc --version; python3 -c "import sys, numpy, cupy; print(sys.version);
print(\"numpy\", numpy.__version__, \"cupy\", cupy.__version__); print(cupy.cuda.Device().attributes[\"WarpSize\"])"'

# First start compiles every kernel module (NVRTC) into the cache; the second must only load it.
step kernels_cold 150 python3 -c "
import time
from hybridllm.backends.cupy_backend import CupyRuntime
t = time.perf_counter(); CupyRuntime(0).kernels.preload()
print('compile+load s', round(time.perf_counter() - t, 2))"
step kernels_warm 45 python3 -c "
import time
from hybridllm.backends.cupy_backend import CupyRuntime
t = time.perf_counter(); CupyRuntime(0).kernels.preload()
print('cached load s', round(time.perf_counter() - t, 2))"

step tests_gpu 230 python3 -m pytest -q -p no:cacheprovider -o addopts="" -rs --junitxml="$OUT/tests_gpu.xml" tests/gpu

step bench_gpu 120 python3 bench/bench_gpu.py --json "$OUT/bench_gpu.json"

cat "$OUT/summary.txt"
exit 0
