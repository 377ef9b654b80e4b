#!/usr/bin/env bash
# One full GPU check, for a session lent a GPU (device tool) or any CUDA box:
# build with CUDA kernels in place, run the GPU tests, compute-sanitizer
# (memcheck, racecheck) on a GPU test subset, then the benchmarks (default
# build, then AOQ_U=1/AOQ_UB=1 for comparison), then the CPU op tests under
# the box's torch: in order of need, so a run cut short by the device
# budget loses the least.
# Wheels of missing packages (torchao) may sit in .whl/ (see README).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L
python3 -c "import torch, torchao; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchao', torchao.__version__)" 2>&1 | grep -v "Failed to load\|_pytree"
AOQ_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "== build ok"
python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
echo "== memcheck"
timeout 400 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
  -k "(equal_cpu and bfloat16 and (32 or 256)) or fp8_rows or row_tail or unstaged or pack or capture" 2>&1 | tee "$OUT/memcheck.log" | tail -4
echo "memcheck rc=${PIPESTATUS[0]}"
echo "== racecheck"
timeout 300 compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
  -k "(equal_cpu and float32 and 128) or row_tail or (equal_cpu and fp8_int4 and bfloat16 and 64)" 2>&1 | tee "$OUT/racecheck.log" | tail -4
echo "racecheck rc=${PIPESTATUS[0]}"
echo "== bench"
python3 benchmarks/bench_fake_quant.py --device cuda 2>&1 | grep -v "Failed to load\|_pytree" | tee "$OUT/bench.txt"
echo "== bench, one group per warp at a time (AOQ_U=1, AOQ_UB=1), for the unroll's effect"
AOQ_NVCC_FLAGS="-DAOQ_U=1 -DAOQ_UB=1" AOQ_CUDA_ARCHS=90 AOQ_CUDA=1 python3 setup.py build_ext --inplace --force > "$OUT/build_u1.log" 2>&1 || { tail -30 "$OUT/build_u1.log"; exit 1; }
python3 benchmarks/bench_fake_quant.py --device cuda 2>&1 | grep -v "Failed to load\|_pytree" | tee "$OUT/bench_u1.txt"
echo "== CPU tests under this torch (CI covers them on its own torch; last, the least needed)"
python3 -m pytest tests/test_fake_quant.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests_cpu.log" | tail -3
