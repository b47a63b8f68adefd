#!/usr/bin/env bash
# Everything only a GPU can show, in one script, run from the repository root on a GPU
# machine (it needs no network). Writes its logs and results under OUT_DIR.
#
#   bash benchmarks/gpu.sh OUT_DIR PART...      PART: first | doctor | tests | ops | mlp | model[=CONFIG,...] | adaptive | lm
#
#   bash benchmarks/gpu.sh $OUT first                                 # the 7-minute first look: start here
#
#   bash benchmarks/gpu.sh $OUT doctor tests ops                      # trm doctor, CUDA tests, op table
#   bash benchmarks/gpu.sh $OUT model=sudoku-mlp,sudoku-att           # model table, profiled
#   bash benchmarks/gpu.sh $OUT model=maze,hrm-sudoku
#   bash benchmarks/gpu.sh $OUT adaptive                              # train sudoku4, adaptive vs fixed evaluation
#   bash benchmarks/gpu.sh $OUT lm                                    # the recurrent-depth LM, plain vs trm_kernels.nn
#   bash benchmarks/gpu.sh $OUT mlp                                   # the fused MLP kernels against cuBLAS + separate ops
#
# first: `python -m trm_benchmarks.first` (environment, ceilings, trm doctor --quick, the op table
# beside the peers, the sudoku training steps against their predicted floor), each section within its
# own time budget, in OUT_DIR/summary.md and a JSON file per section. Peers that do not import are
# installed first from benchmarks/wheels (`python -m trm_benchmarks.peers download benchmarks/wheels`
# on a machine with a network), without an index.
# doctor: `trm doctor` (environment, parity of every op and dtype, graphs, op speeds) in
# OUT_DIR/doctor/. tests: build the extension, then every test on CUDA (bf16 kernels, the extension,
# graph capture, graph vs eager). ops: results in OUT_DIR/ops/. mlp: the SwiGLU MLP's op rows
# (OUT_DIR/mlp/: eager, torch.compile, cuBLAS + swiglu, our GEMM epilogues, auto's timed
# choice) and the mlp_t sub-layer's with grad (eager, torch.compile, the composition, the
# fused training kernels, auto's timed choice), the norm-epilogue ops' (the MLP sub-layer with
# its one-kernel form, o_proj + norm), then the sudoku-mlp and sudoku-att model tables with
# every fused GEMM kernel forced (TRM_TUNE=off, OUT_DIR/mlp-model-off/) and with the
# compositions instead (TRM_TUNE=composed, OUT_DIR/mlp-model-composed/).
# model: results in OUT_DIR/model/, with a profile of each config's training step. Benchmarks rewrite their
# results as they go, so a part stopped by a time limit (PART_TIMEOUT seconds, default
# 540) keeps what it measured. Merge the parts of one GPU run with
# `python -m trm_benchmarks.run --out DIR --merge OPS_DIR MODEL_DIR...`.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR first|doctor|tests|ops|mlp|model[=CONFIGS]|adaptive|lm...}"
shift
limit="${PART_TIMEOUT:-540}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  # setup.py builds trm_kernels._C ahead of time; --no-deps: nothing can be downloaded there
  # if the extension does not build, install without it so that everything else still runs
  # (the ops then try the JIT build on first use, and fall back to Triton with a warning)
  python3 -m pip install -q --no-build-isolation --no-deps -e . \
    || { echo "install with the CUDA extension failed; installing without it"
         TRM_NO_CUDA_EXT=1 python3 -m pip install -q --no-build-isolation --no-deps -e . || echo "install failed"; }
  python3 -c "import trm_kernels._C; print('CUDA extension built: trm_kernels._C')"
} > "$out/build.log" 2>&1
tail -3 "$out/build.log"

for part in "$@"; do
  case "$part" in
    first)
      # the peers, where they do not import, from the wheels carried here (no network, no index)
      if [[ -d benchmarks/wheels ]] && ! python3 -c "import liger_kernel, quack" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps benchmarks/wheels/*.whl >> "$out/build.log" 2>&1 \
          || echo "installing the peers from benchmarks/wheels failed (see build.log); they are listed as not installed"
      fi
      timeout "${FIRST_TIMEOUT:-480}" python3 -m trm_benchmarks.first --out "$out" 2>&1 | tee -a "$out/build.log" \
        | tail -40 ;;
    doctor)
      timeout "$limit" trm doctor --out "$out/doctor" 2>&1 | tee "$out/doctor.log" | tail -5 ;;
    tests)
      # 8 workers where pytest-xdist is installed: Triton compiles each kernel variant the
      # tests reach (a second or so each), and that, not the GPU, is what takes the time
      workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
      timeout "$limit" python3 -m pytest -q -p no:cacheprovider "${workers[@]}" -m "not slow" -k "not learns_4x4" tests 2>&1 \
        | tee "$out/pytest.log" | tail -15 ;;
    ops)
      timeout "$limit" python3 -m trm_benchmarks.run --out "$out/ops" --only ops 2>&1 | tee "$out/bench-ops.log" | tail -5 ;;
    model|model=*)
      configs=()
      [[ "$part" == model=* ]] && configs=(--configs "${part#model=}")
      timeout "$limit" python3 -m trm_benchmarks.run --out "$out/model" --only model --profile "${configs[@]}" 2>&1 \
        | tee "$out/bench-model.log" | tail -5 ;;
    adaptive)
      # halting means nothing with random weights: train the sudoku4 preset (2048 test puzzles, enough for
      # batch 768), then adaptive against fixed-step evaluation, eager and fused + CUDA graphs, batch 768 and 1
      timeout "$limit" bash -c "trm train --preset sudoku4 --set data.num_test=2048 --out '$out/sudoku4-run' \
          > '$out/sudoku4-train.log' 2>&1 && python3 -m trm_benchmarks.run --out '$out/adaptive' --only adaptive \
          --adaptive-run '$out/sudoku4-run'" 2>&1 | tee "$out/bench-adaptive.log" | tail -8 ;;
    mlp)
      timeout "$limit" python3 -m trm_benchmarks.run --out "$out/mlp" --only mlp 2>&1 | tee "$out/bench-mlp.log" | tail -8
      for mode in off composed; do
        TRM_TUNE=$mode timeout "$limit" python3 -m trm_benchmarks.run --out "$out/mlp-model-$mode" --only model \
          --configs sudoku-mlp,sudoku-att --no-compile 2>&1 | tee "$out/bench-mlp-model-$mode.log" | tail -4
      done ;;
    lm)
      # another recursive model: the recurrent-depth LM's training step, plain PyTorch against trm_kernels.nn
      timeout "$limit" python3 -m trm_benchmarks.run --out "$out/lm" --only lm 2>&1 | tee "$out/bench-lm.log" | tail -5 ;;
    *) echo "unknown part: $part (first, doctor, tests, ops, mlp, model[=CONFIGS], adaptive, lm)"; exit 2 ;;
  esac
done
