"""Build of ao_awq_export._C: C sources with the system C compiler, CUDA
kernels with nvcc when a CUDA build of torch and nvcc are both present.

torch is located without importing it (so `pip install .` works with build
isolation): its headers (the C shim) and libtorch_cpu are found next to the
installed package.  Environment: AOQ_CUDA=0 forces a CPU-only build,
AOQ_CUDA=1 requires CUDA; AOQ_CUDA_ARCHS (default "80;90") picks targets.
"""
import glob
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def find_torch():
    cands = []
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        cands.append(os.path.dirname(spec.origin))
    dirs = [sysconfig.get_paths().get(k) for k in ("purelib", "platlib")]
    try:
        dirs += site.getsitepackages()
    except AttributeError:
        pass
    dirs += [os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")]
    cands += [os.path.join(d, "torch") for d in dirs if d]
    for c in cands:
        if os.path.isfile(os.path.join(c, "include", "torch", "csrc", "inductor", "aoti_torch", "c", "shim.h")):
            return c
    sys.exit("ao_awq_export: cannot find an installed torch (>= 2.11) with its C headers; "
             "install torch first, e.g. `pip install torch==2.13.0`")


TORCH = find_torch()
_ver = open(os.path.join(TORCH, "version.py")).read()
TORCH_VERSION = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", _ver).group(1)
_cuda = re.search(r"^cuda\s*[:=].*?['\"]([^'\"]+)['\"]", _ver, re.M)
TORCH_CUDA = _cuda.group(1) if _cuda else None


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    if os.path.exists(nvcc):
        return nvcc
    return shutil.which("nvcc")


want = os.environ.get("AOQ_CUDA", "auto")
NVCC = find_nvcc()
WITH_CUDA = want == "1" or (want == "auto" and TORCH_CUDA is not None and NVCC is not None)
if WITH_CUDA and (NVCC is None or TORCH_CUDA is None):
    sys.exit("ao_awq_export: AOQ_CUDA=1 needs nvcc and a CUDA build of torch")
if WITH_CUDA:
    _nv = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    _m = re.search(r"release (\d+)\.", _nv)
    if _m and _m.group(1) != TORCH_CUDA.split(".")[0]:
        sys.exit(f"ao_awq_export: nvcc is CUDA {_m.group(1)} but torch was built with CUDA {TORCH_CUDA}; "
                 "point CUDA_HOME at a matching toolkit or set AOQ_CUDA=0")

CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fexceptions",
          "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
# USE_CUDA makes torch's shim.h declare the CUDA functions, so shim_check.cpp
# also checks aoti_torch_get_current_cuda_stream's signature
DEFINES = [("AOQ_WITH_CUDA", "1"), ("USE_CUDA", "1")] if WITH_CUDA else []
LIBS = ["torch_cpu", "c10", "gomp"]
if WITH_CUDA:
    LIBS += ["torch_cuda", "cudart"]


class BuildExt(build_ext):
    """Compiles the .cu files with nvcc into objects linked into _C."""

    def build_extension(self, ext):
        # torch's headers (included by shim_check.cpp) need C++17; older gcc/clang
        # default to C++14.  Only the .cpp gets the flag (it is invalid for C).
        orig = self.compiler._compile

        def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            if src.endswith(".cpp"):
                extra_postargs = list(extra_postargs) + ["-std=c++17"]
            return orig(obj, src, ext_, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        if WITH_CUDA:
            archs = os.environ.get("AOQ_CUDA_ARCHS", "80;90").split(";")
            objdir = os.path.join(self.build_temp, "cuda")
            os.makedirs(objdir, exist_ok=True)
            for cu in sorted(glob.glob(os.path.join(HERE, "csrc", "kernels", "*.cu"))):
                obj = os.path.join(objdir, os.path.basename(cu) + ".o")
                cmd = [NVCC, "-c", cu, "-o", obj, "-O3", "--fmad=false", "-std=c++17", "--threads", "0",
                       "-Xcompiler", "-fPIC", "-DAOQ_WITH_CUDA=1", "-I" + os.path.join(HERE, "csrc")]
                cmd += os.environ.get("AOQ_NVCC_FLAGS", "").split()  # e.g. kernel tuning knobs
                for a in archs:
                    cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
                # PTX of the newest target too, so newer GPUs can JIT it
                cmd += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                ext.extra_objects.append(obj)
            cuda_home = os.path.dirname(os.path.dirname(NVCC))
            for d in ("lib64", "lib"):
                if os.path.isdir(os.path.join(cuda_home, d)):
                    ext.library_dirs.append(os.path.join(cuda_home, d))
        super().build_extension(ext)


ext = Extension(
    "ao_awq_export._C",
    sources=sorted(glob.glob("csrc/*.c")) + sorted(glob.glob("csrc/kernels/*.c")) + ["csrc/shim_check.cpp"],
    include_dirs=[os.path.join(HERE, "csrc"), os.path.join(TORCH, "include")],
    library_dirs=[os.path.join(TORCH, "lib")],
    libraries=LIBS,
    define_macros=DEFINES,
    extra_compile_args=CFLAGS,
    extra_link_args=["-fopenmp"],
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
)
