#!/usr/bin/env bash
# The default CUDA build (sm_80 + sm_90, as tools/gpu_check.sh makes it),
# made ahead on a machine without a GPU (nvcc only), for the device machine:
# gpu_check.sh takes it instead of spending minutes of the device's time in
# nvcc, where it was built from the same sources for the same Python and
# torch, and loads there; otherwise it builds as before.
#
#   PYTHON=/path/to/venv/bin/python bash tools/prebuild_for_device.sh
#
# PYTHON: a Python with the device image's version and torch (the machines
# lent to this project: Python 3.12, torch 2.11.0+cu130), e.g.
#   python3.12 -m venv v312 && v312/bin/pip install torch==2.11.0 setuptools
# (add torchao etc. to it without .ci/constraints.txt, which pins torch 2.13.0)
# Writes .whl/prebuilt/<sources' sum>/_C<EXT_SUFFIX> and torch_version (one
# build at a time: carry is 64 MiB); .whl/ is git-ignored and goes to the
# device with run(..., carry=[".whl"]).  A change to setup.py or csrc/ makes
# it stale (a new sum): run this again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:?set PYTHON to a Python with the device torch (see the header)}
export PATH=/usr/local/cuda/bin:$PATH
sum=$(bash tools/gpu_check.sh sum)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir "$dir/src"
cp -a setup.py pyproject.toml csrc ao_awq_export "$dir/src/"
rm -f "$dir"/src/ao_awq_export/_C*.so
[ "$(cd "$dir/src" && bash "$OLDPWD/tools/gpu_check.sh" sum)" = "$sum" ] ||
  { echo "the copied sources' sum differs from the repository's" >&2; exit 1; }
(cd "$dir/src" && AOQ_NVCC_FLAGS="" AOQ_CUDA_ARCHS="80;90" AOQ_CUDA=1 \
  "$PY" setup.py build_ext --inplace --force > "$dir/build.log" 2>&1) ||
  { tail -40 "$dir/build.log"; exit 1; }
so=_C$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
# it must load, with its CUDA kernels, under that torch (no GPU needed)
(cd "$dir/src" && "$PY" -c "import torch; from ao_awq_export import _C; assert _C.built_with_cuda()")
out=.whl/prebuilt/$sum
rm -rf .whl/prebuilt
mkdir -p "$out"
cp "$dir/src/ao_awq_export/$so" "$out/$so"
"$PY" -c "import torch; print(torch.__version__)" > "$out/torch_version"
echo "prebuilt: $out/$so (torch $(cat "$out/torch_version"), $(du -h "$out/$so" | cut -f1))"
