#!/usr/bin/env bash
# The GPU half of `make bench`, on a machine whose python3 already holds torch with CUDA and that
# cannot reach a package index: what else the benchmarks need comes as wheels in .whl/ (README,
# "Performance"). Writes the GPU tests' log, the GPU's name and the benchmarks' figures to $OUT.
# Usage: OUT=dir benchmarks/gpu.sh [benchmark ...]   (default: the GPU-bound ones)
set -u
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 BENCH_DEVICES=cuda
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        echo "the wheels did not install: the benchmarks that need Bluesky and Tiled will fail"
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -W default::DeprecationWarning -W default::UserWarning \
    tests/test_precision.py tests/test_stitching.py >"$out/gpu-tests.log" 2>&1
echo "GPU tests: exit $?"
tail -5 "$out/gpu-tests.log"
# torch.compile last: its build time is the least certain
benchmarks=("$@")
[ ${#benchmarks[@]} -gt 0 ] || benchmarks=(bench_inference bench_engine bench_live bench_compile)
timeout "${BENCH_TIMEOUT_S:-420}" python3 benchmarks/run.py --only "${benchmarks[@]}" --out "$out"
