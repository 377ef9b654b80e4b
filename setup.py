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


def _base_site_visible():
    """Whether the base interpreter's site-packages belong to this
    environment: outside a venv, or in one made with
    --system-site-packages.  (Inside a plain venv the base interpreter's
    torch is not the one the package will run with.)"""
    if sys.prefix == sys.base_prefix:
        return True
    try:
        with open(os.path.join(sys.prefix, "pyvenv.cfg")) as f:
            return bool(re.search(r"^include-system-site-packages\s*=\s*true", f.read(), re.M | re.I))
    except OSError:
        return False


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
    cands += [os.path.join(d, "torch") for d in dirs if d]
    base = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                        "site-packages", "torch")
    for c in cands + [base]:
        if os.path.isfile(os.path.join(c, "include", "torch", "csrc", "inductor", "aoti_torch", "c", "shim.h")):
            if c == base and c not in cands and not _base_site_visible():
                # a build venv (python -m build) made from the base interpreter
                # sees only it; from another venv this may not be the torch the
                # package will run with
                print(f"ao_awq_export: WARNING: no torch in this environment; building against the "
                      f"base interpreter's ({c}); if that is not the torch you will run, build with "
                      "`pip install --no-build-isolation .` in your environment", file=sys.stderr)
            return c
    sys.exit("ao_awq_export: cannot find an installed torch (>= 2.11) with its C headers; "
             "install torch first, e.g. `pip install torch==2.13.0`")


def torch_info():
    """(torch directory, version, CUDA version or None), found once, at build time
    (an sdist needs no torch)."""
    if not hasattr(torch_info, "v"):
        d = find_torch()
        ver = open(os.path.join(d, "version.py")).read()
        version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", ver).group(1)
        cuda = re.search(r"^cuda\s*[:=].*?['\"]([^'\"]+)['\"]", ver, re.M)
        torch_info.v = (d, version, cuda.group(1) if cuda else None)
        print(f"ao_awq_export: building against torch {version} at {d}", file=sys.stderr)
    return torch_info.v


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    if os.path.exists(nvcc):
        return nvcc
    return shutil.which("nvcc")


def cuda_config():
    """(nvcc or None, whether to build the CUDA kernels), at build time."""
    _, _, torch_cuda = torch_info()
    want = os.environ.get("AOQ_CUDA", "auto")
    nvcc = find_nvcc()
    with_cuda = want == "1" or (want == "auto" and torch_cuda is not None and nvcc is not None)
    if with_cuda and (nvcc is None or torch_cuda is None):
        sys.exit("ao_awq_export: AOQ_CUDA=1 needs nvcc and a CUDA build of torch")
    if with_cuda:
        nv = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release (\d+)\.", nv)
        if m and m.group(1) != torch_cuda.split(".")[0]:
            sys.exit(f"ao_awq_export: nvcc is CUDA {m.group(1)} but torch was built with CUDA {torch_cuda}; "
                     "point CUDA_HOME at a matching toolkit or set AOQ_CUDA=0")
    return nvcc, with_cuda


CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fexceptions",
          "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]


class BuildExt(build_ext):
    """Compiles the .cu files with nvcc into objects linked into _C."""

    def build_extension(self, ext):
        torch_dir = torch_info()[0]
        nvcc, with_cuda = cuda_config()
        ext.include_dirs.append(os.path.join(torch_dir, "include"))
        ext.library_dirs.append(os.path.join(torch_dir, "lib"))
        ext.libraries += ["torch_cpu", "c10", "gomp"] + (["torch_cuda", "cudart"] if with_cuda else [])
        # USE_CUDA makes torch's shim.h declare the CUDA functions, so shim_check.cpp
        # also checks aoti_torch_get_current_cuda_stream's signature
        ext.define_macros += [("AOQ_WITH_CUDA", "1"), ("USE_CUDA", "1")] if with_cuda else []
        # torch's headers (included by shim_check.cpp) need C++17; older gcc/clang
        # default to C++14.  Only the .cpp gets the flag (it is invalid for C).
        orig = self.compiler._compile

        def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            if src.endswith(".cpp"):
                extra_postargs = list(extra_postargs) + ["-std=c++17"]
            return orig(obj, src, ext_, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        if with_cuda:
            archs = os.environ.get("AOQ_CUDA_ARCHS", "80;90").split(";")
            objdir = os.path.join(self.build_temp, "cuda")
            os.makedirs(objdir, exist_ok=True)
            for cu in sorted(glob.glob(os.path.join(HERE, "csrc", "kernels", "*.cu"))):
                obj = os.path.join(objdir, os.path.basename(cu) + ".o")
                cmd = [nvcc, "-c", cu, "-o", obj, "-O3", "--fmad=false", "-std=c++17", "--threads", "0",
                       "-Xcompiler", "-fPIC", "-DAOQ_WITH_CUDA=1", "-I" + os.path.join(HERE, "csrc")]
                cmd += os.environ.get("AOQ_NVCC_FLAGS", "").split()  # e.g. kernel tuning knobs
                for a in archs:
                    cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
                # PTX of the newest target too, so newer GPUs can JIT it
                cmd += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
                ext.extra_objects.append(obj)
            cuda_home = os.path.dirname(os.path.dirname(nvcc))
            for d in ("lib64", "lib"):
                if os.path.isdir(os.path.join(cuda_home, d)):
                    ext.library_dirs.append(os.path.join(cuda_home, d))
        super().build_extension(ext)


ext = Extension(
    "ao_awq_export._C",
    sources=sorted(glob.glob("csrc/*.c")) + sorted(glob.glob("csrc/kernels/*.c")) + ["csrc/shim_check.cpp"],
    include_dirs=[os.path.join(HERE, "csrc")],  # torch's: BuildExt, at build time
    library_dirs=[],
    libraries=[],
    define_macros=[],
    extra_compile_args=CFLAGS,
    extra_link_args=["-fopenmp"],
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt},
)
