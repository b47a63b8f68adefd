#!/usr/bin/env bash
# Everything only a GPU can show, in one script (run from the repository root on the
# device machine, which has no network). Writes its logs and results under OUT_DIR.
#
#   bash benchmarks/gpu.sh OUT_DIR [tests|ops|model|all]
#
# Each part fits the device tool's 10-minute call: tests (build the extension, the CUDA
# and fused tests in bf16), ops (op-level benchmarks), model (model-level benchmarks).
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR [tests|ops|model|all]}"
part="${2:-all}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/env.txt" 2>&1
# setup.py builds trm_kernels._C ahead of time; --no-deps: nothing can be downloaded there
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || echo "install failed: see build.log"
python3 -c "import trm_kernels._C; print('CUDA extension built: trm_kernels._C')" >> "$out/build.log" 2>&1

if [[ "$part" == tests || "$part" == all ]]; then
  python3 -m pytest -q -p no:cacheprovider -k "not learns_4x4" tests 2>&1 | tee "$out/pytest.log" | tail -15
fi
if [[ "$part" == ops || "$part" == all ]]; then
  python3 -m benchmarks.run --out "$out" --only ops 2>&1 | tee "$out/bench-ops.log" | tail -5
fi
if [[ "$part" == model || "$part" == all ]]; then
  python3 -m benchmarks.run --out "$out/model" --only model 2>&1 | tee "$out/bench-model.log" | tail -5
fi
