#!/usr/bin/env bash
# Every GPU check of the W4A4 kernels in one call of a lent H100 / H200 (tool `device`, `run`).
#
# The device machine has torch and triton but no package index and no diffusers, so prepare on
# this machine first (the wheel is pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl "diffusers==$(python -c 'import diffusers as d; print(d.__version__)')"
# then call run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540).
#
# It runs the kernel tests compiled on the GPU (DIFFOPT_TEST_DEVICE=cuda), then
# benchmarks/w4a4_gpu.py with the tile sweep. Logs and the JSON land in $OUT (or gpu-out/).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: see the header of $0" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl || exit 2
# diffopt as a package without building it: its subpackages live at the top of the repo
mkdir -p /tmp/pkg && rm -rf /tmp/pkg/diffopt && cp -r diffopt /tmp/pkg/diffopt
for sub in passes runtime kernels exporters; do ln -s "$PWD/$sub" "/tmp/pkg/diffopt/$sub"; done
export PYTHONPATH=/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
  | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"

DIFFOPT_TEST_DEVICE=cuda timeout 240 python3 -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tee "$out/kernel-tests.log" | tail -25
tests=${PIPESTATUS[0]}

timeout 300 python3 benchmarks/w4a4_gpu.py --sweep --tokens 1024 4096 --out "$out" 2>&1 \
  | tee "$out/w4a4-gpu.log" | tail -20
bench=${PIPESTATUS[0]}

echo "kernel tests: exit $tests; benchmark: exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
