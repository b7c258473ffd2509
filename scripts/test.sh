#!/usr/bin/env bash
# The project's test command (README; CI runs exactly this through .ci/run).
# Installs what the tests need on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# hipcc compiles the kernels for gfx906 (AMD MI50) in CI; nvcc comes with the CUDA toolkit image.
if ! command -v hipcc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc) >/dev/null \
        || echo "warning: could not install hipcc; the gfx906 compile test will fail" >&2
fi
python3 -m pip install -q -e '.[test]'
python3 -m pytest -q "$@"
