#!/usr/bin/env bash
# The GPU check, for a session lent a GPU (device tool) or any CUDA box:
#
#   bash tools/gpu_check.sh [PHASE ...]      (default: all of them, in this order)
#
#   test      build with CUDA kernels in place (skipped if built), GPU tests
#   sanitize  compute-sanitizer memcheck and racecheck on a GPU test subset
#   bench     the benchmark (staged and unstaged fp8 rows side by side)
#   extra     a rebuild with the fast paths' bf16 rounding by the hardware's
#             conversion (AOQ_BF16_HW_ROUND=1, this GPU's arch only), its bf16
#             GPU tests and benchmark; one with one group per warp in flight
#             (AOQ_U/UB/UBS=1), benchmarked for the unroll's effect; then the
#             CPU op tests under the box's torch (a later phase rebuilds the
#             default kernels)
#
# In order of need, so a run cut short by the device budget loses the least;
# all four take more than the device tool's 10 minutes per command, so run
# them as separate commands (each phase prints its wall time; test+bench fit
# one).  Outputs go to $OUT; the exit status is 1 if a test run failed.
# Wheels of missing packages (torchao) may sit in .whl/ (see README).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
PHASES=${*:-test sanitize bench extra}
failed=0
# pytest with its output in $OUT/$1.log (tail shown); a failure is remembered
run_pytest() {
  local log=$1
  shift
  "$@" 2>&1 | tee "$OUT/$log.log" | tail -"${TAIL:-15}"
  local rc=${PIPESTATUS[0]}
  echo "$log rc=$rc"
  [ "$rc" = 0 ] || failed=1
}
quiet() { grep -v "Failed to load\|_pytree\|register_constant"; }

# build [tag [nvcc flags [archs]]]: the CUDA kernels in place; the default
# build is skipped when one of the same sources is there (from an earlier call)
build() {
  local tag=${1:-default} mark=build/.gpu_check_default
  local sum
  sum=$(cat setup.py csrc/*.* csrc/kernels/*.* | sha256sum | cut -c1-16)
  if [ "$tag" = default ] && [ "$(cat $mark 2>/dev/null)" = "$sum" ] &&
    python3 -c "from ao_awq_export import _C; assert _C.built_with_cuda()" 2>/dev/null; then
    return 0
  fi
  rm -f $mark
  AOQ_NVCC_FLAGS="${2:-}" AOQ_CUDA_ARCHS="${3:-80;90}" AOQ_CUDA=1 python3 setup.py build_ext --inplace --force \
    > "$OUT/build_$tag.log" 2>&1 || { tail -60 "$OUT/build_$tag.log"; exit 1; }
  if [ "$tag" = default ]; then mkdir -p build && echo "$sum" > $mark; fi
  echo "== build ($tag) ok"
}

nvidia-smi -L
python3 -c "import torch, torchao; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchao', torchao.__version__)" 2>&1 | quiet
for phase in $PHASES; do
  t0=$(date +%s)
  case $phase in
    test)
      build
      run_pytest tests python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider
      ;;
    sanitize)
      build
      echo "== memcheck"  # the two timeouts stay under the device tool's 600 s
      TAIL=4 run_pytest memcheck timeout 290 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
        -k "(equal_cpu and bfloat16 and (32 or 256)) or fp8_rows or row_tail or unstaged or pack or capture or special_rows or (domain_edges and bfloat16) or every_f16"
      echo "== racecheck"
      TAIL=4 run_pytest racecheck timeout 230 compute-sanitizer --tool racecheck --error-exitcode 9 \
        python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider \
        -k "(equal_cpu and float32 and 128) or row_tail or (equal_cpu and fp8_int4 and bfloat16 and 64)"
      ;;
    bench)
      build
      python3 benchmarks/bench_fake_quant.py --device cuda 2>&1 | quiet | tee "$OUT/bench.txt"
      ;;
    extra)
      arch=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
      echo "== bf16 fast-path rounding by cvt.rn.bf16.f32 (AOQ_BF16_HW_ROUND=1): tests, bench"
      build bf16hw "-DAOQ_BF16_HW_ROUND=1" "$arch"
      TAIL=3 run_pytest tests_bf16hw python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider -k bfloat16
      python3 benchmarks/bench_fake_quant.py --device cuda --no-compile 2>&1 | quiet | tee "$OUT/bench_bf16hw.txt"
      echo "== bench, one group or step per warp at a time (AOQ_U/UF/UB/UBS=1), for the unroll's effect"
      build u1 "-DAOQ_U=1 -DAOQ_UF=1 -DAOQ_UB=1 -DAOQ_UBS=1" "$arch"
      python3 benchmarks/bench_fake_quant.py --device cuda --no-compile 2>&1 | quiet | tee "$OUT/bench_u1.txt"
      echo "== CPU tests under this torch (CI covers them on its own torch; last, the least needed)"
      TAIL=3 run_pytest tests_cpu python3 -m pytest tests/test_fake_quant.py -q -x -p no:cacheprovider
      ;;
    *) echo "unknown phase: $phase (test, sanitize, bench, extra)"; exit 2 ;;
  esac
  echo "== phase $phase: $(( $(date +%s) - t0 )) s"
done
exit $failed
