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
#   lease     what the issue's "done when" needs, in one device command that
#             fits a 15-minute lease: build, GPU tests, memcheck (at most
#             220 s), racecheck (120 s), benchmark, each cut to what
#             AOQ_GPU_BUDGET (default 540 s from the start of the script)
#             leaves; each step's end time is printed; run it as
#               run(command="bash tools/gpu_check.sh lease", timeout_s=600,
#                   carry=[".whl"])
#             A step the budget no longer allows is skipped, and says so.
#             Where tools/prebuild_for_device.sh left a build of these
#             sources in .whl/prebuilt/, the build step takes it.
#   sum       print the sum of the build's sources (prebuilt's name)
#
# In order of need, so a run cut short by the device budget loses the least;
# test+sanitize+bench+extra take more than the device tool's 10 minutes per
# command, so run them as separate commands (each phase prints its wall
# time), or `lease`.  Where pytest-xdist is installed, the GPU tests run in
# AOQ_GPU_JOBS processes (default 8) sharing the GPU; the memcheck subset in
# AOQ_GPU_SAN_JOBS processes where that is set (one by default).
# Outputs go to $OUT; the exit status is 1 if a test run failed or a step was
# cut short or skipped by the budget.
# Wheels of missing packages (torchao) may sit in .whl/ (see README).
set -u
# the sum of the build's sources (a fixed glob order: LC_ALL=C)
src_sum() { (LC_ALL=C; cat setup.py csrc/*.* csrc/kernels/*.* | sha256sum | cut -c1-16); }
[ "${1:-}" = sum ] && { src_sum; exit 0; }
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
PHASES=${*:-test sanitize bench extra}
failed=0
T0=$(date +%s)
case " $PHASES " in *" lease "*) BUDGET=${AOQ_GPU_BUDGET:-540} ;; *) BUDGET=${AOQ_GPU_BUDGET:-0} ;; esac
# left CAP: the seconds a step may run: CAP, or less where the budget (if
# any) leaves less, keeping 10 s for the script's own end
left() {
  local cap=$1 r
  if [ "$BUDGET" -gt 0 ]; then
    r=$((BUDGET - ($(date +%s) - T0) - 10))
    [ "$r" -lt "$cap" ] && cap=$r
  fi
  echo "$cap"
}
# fits NAME MIN: whether at least MIN seconds are left for step NAME (else
# it is skipped, and the run counts as failed: it did not check everything)
fits() {
  if [ "$(left 100000)" -lt "$2" ]; then
    echo "== $1: SKIPPED, $(left 100000) s of the ${BUDGET} s budget left (needs $2)"
    failed=1
    return 1
  fi
}
# the pytest processes: pytest-xdist's -n where it is installed
JOBS=()
if python3 -c "import xdist" 2>/dev/null; then JOBS=(-n "${AOQ_GPU_JOBS:-8}"); fi
# pytest with its output in $OUT/$1.log (tail shown); a failure is remembered;
# an exit by timeout (124) says so
run_pytest() {
  local log=$1
  shift
  "$@" 2>&1 | tee "$OUT/$log.log" | tail -"${TAIL:-15}"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "$log: CUT SHORT by its time limit"
  echo "$log rc=$rc"
  [ "$rc" = 0 ] || failed=1
}
quiet() { grep -v "Failed to load\|_pytree\|register_constant"; }

# build [tag [nvcc flags [archs]]]: the CUDA kernels in place; the default
# build is skipped when one of the same sources is there (from an earlier
# call), or taken from .whl/prebuilt/<sources' sum>/ where
# tools/prebuild_for_device.sh left one for this Python and torch (saves the
# device the nvcc minutes; anything amiss and it builds as usual)
build() {
  local tag=${1:-default} mark=build/.gpu_check_default
  local sum pre so
  sum=$(src_sum)
  if [ "$tag" = default ] && [ "$(cat $mark 2>/dev/null)" = "$sum" ] &&
    python3 -c "from ao_awq_export import _C; assert _C.built_with_cuda()" 2>/dev/null; then
    return 0
  fi
  rm -f $mark
  pre=.whl/prebuilt/$sum
  so=_C$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  if [ "$tag" = default ] && [ -f "$pre/$so" ] &&
    [ "$(cat "$pre/torch_version" 2>/dev/null)" = "$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)" ]; then
    cp "$pre/$so" "ao_awq_export/$so"
    if python3 -c "from ao_awq_export import _C; assert _C.built_with_cuda()"; then
      mkdir -p build && echo "$sum" > $mark
      echo "== build: prebuilt $pre/$so ($(cat "$pre/torch_version"))"
      return 0
    fi
    echo "== build: the prebuilt $pre/$so does not load here, or has no CUDA kernels: building"
    rm -f "ao_awq_export/$so"
  fi
  AOQ_NVCC_FLAGS="${2:-}" AOQ_CUDA_ARCHS="${3:-80;90}" AOQ_CUDA=1 python3 setup.py build_ext --inplace --force \
    > "$OUT/build_$tag.log" 2>&1 || { tail -60 "$OUT/build_$tag.log"; exit 1; }
  if [ "$tag" = default ]; then mkdir -p build && echo "$sum" > $mark; fi
  echo "== build ($tag) ok"
}

nvidia-smi -L
python3 -c "import torch, torchao; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchao', torchao.__version__)" 2>&1 | quiet
MEMCHECK_K="(equal_cpu and bfloat16 and (32 or 256)) or fp8_rows or row_tail or unstaged or pack or capture or special_rows or (domain_edges and bfloat16) or every_f16"
RACECHECK_K="(equal_cpu and float32 and 128) or row_tail or (equal_cpu and fp8_int4 and bfloat16 and 64)"
PYTEST=(python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider)
# the GPU tests without -x: a scarce GPU session should report every failure
do_test() {
  fits tests 60 || return 0
  run_pytest tests timeout "$(left 590)" python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE "${JOBS[@]}"
}
# memcheck runs in one process unless AOQ_GPU_SAN_JOBS asks for more
# (compute-sanitizer then follows pytest-xdist's worker processes too)
do_memcheck() {
  fits memcheck 60 || return 0
  echo "== memcheck"
  local jobs=() follow=()
  if [ -n "${AOQ_GPU_SAN_JOBS:-}" ] && [ ${#JOBS[@]} -gt 0 ]; then
    jobs=(-n "$AOQ_GPU_SAN_JOBS") follow=(--target-processes all)
  fi
  TAIL=4 run_pytest memcheck timeout "$(left "${1:-290}")" compute-sanitizer --tool memcheck --error-exitcode 9 \
    "${follow[@]}" "${PYTEST[@]}" "${jobs[@]}" -k "$MEMCHECK_K"
}
do_racecheck() {
  fits racecheck 45 || return 0
  echo "== racecheck"
  TAIL=4 run_pytest racecheck timeout "$(left "${1:-230}")" compute-sanitizer --tool racecheck --error-exitcode 9 \
    "${PYTEST[@]}" -k "$RACECHECK_K"
}
# the benchmark prints each row as it is measured, so one cut short by its
# time limit still leaves the rows before it in $OUT/bench.txt
do_bench() {
  fits bench 60 || return 0
  timeout "$(left 590)" python3 benchmarks/bench_fake_quant.py --device cuda "$@" 2>&1 | quiet | tee "$OUT/bench.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "bench: CUT SHORT by its time limit"
  [ "$rc" = 0 ] || failed=1
}

for phase in $PHASES; do
  t0=$(date +%s)
  case $phase in
    test)
      build
      do_test
      ;;
    sanitize)
      build
      do_memcheck
      do_racecheck
      ;;
    bench)
      build
      do_bench
      ;;
    lease)
      build
      echo "== build done at $(( $(date +%s) - T0 )) s"
      do_test
      echo "== tests done at $(( $(date +%s) - T0 )) s"
      do_memcheck 220
      echo "== memcheck done at $(( $(date +%s) - T0 )) s"
      do_racecheck 120
      echo "== racecheck done at $(( $(date +%s) - T0 )) s"
      do_bench
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
    *) echo "unknown phase: $phase (test, sanitize, bench, extra, lease)"; exit 2 ;;
  esac
  echo "== phase $phase: $(( $(date +%s) - t0 )) s"
done
exit $failed
