#!/usr/bin/env bash
# Every GPU check of the quantized-linear kernels (kernels/triton_quant.py) in one call of a lent
# H100 / H200 (tool `device`, `run`):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)
#
# The device machine is bare: torch and triton, no package index, no diffopt install. The
# kernels and these tests import without diffusers; a wheel in .whl/ (carry=[".whl"]) is
# installed if present, for anything that needs more.
#
# It runs tests/kernels compiled on the GPU (DIFFOPT_TEST_DEVICE=cuda), then
# benchmarks/w4a4_gpu.py with the tile sweep. Logs and the JSON land in $OUT (or gpu-out/);
# the benchmark rewrites its JSON after every shape, so a cut-off run keeps what it measured.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# diffopt without building it: pytest puts the repo root first on sys.path, so give the root's
# diffopt/ the subpackages that pyproject.toml maps in from the top of the repo
for sub in passes runtime kernels exporters; do
  [ -e "diffopt/$sub" ] || ln -s "../$sub" "diffopt/$sub"
done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
  | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"

# the dry-run and sm_90-compile tests are CPU checks: they ran in CI already
DIFFOPT_TEST_DEVICE=cuda timeout 200 python3 -m pytest tests/kernels -q -p no:cacheprovider \
  -k "not dry_run and not hopper and not records_a_failing" 2>&1 \
  | tee "$out/kernel-tests.log" | tail -25
tests=${PIPESTATUS[0]}

timeout 300 python3 benchmarks/w4a4_gpu.py --sweep --tokens 1024 4096 --out "$out" 2>&1 \
  | tee "$out/w4a4-gpu.log" | tail -20
bench=${PIPESTATUS[0]}

echo "kernel tests: exit $tests; benchmark: exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
