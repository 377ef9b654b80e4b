"""Build a CUDA source of ours for the CPU emulator (tests/cuda_emu/cuda_runtime.h).

Two rewrites: the launch syntax, `kernel<<<grid, block, smem, stream>>>(`
becomes `aoq_emu::launch(kernel, grid, block, smem, stream)(`, and each
`__shared__` declaration becomes a function static the emulator poisons
before every block (`extern __shared__`, the dynamic shared memory: a
pointer to the launch's buffer, poisoned too).  Every other line is
compiled as written, by the host C++ compiler with contraction off (the CUDA
build uses --fmad=false), against the emulated runtime.  Libraries are
cached under build/cuda_emu/ by a hash of the sources and the command.
AOQ_EMU_ASAN=1 builds with AddressSanitizer (out-of-bounds accesses of the
kernels to their buffers are reported, like compute-sanitizer's memcheck).
"""
import ctypes
import hashlib
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "build", "cuda_emu")

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;{}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
DYN_SHARED = re.compile(r"extern\s+__shared__\s+([A-Za-z_]\w*)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;")
SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*(\[[^;\]]*\])?\s*;")


def rewrite_shared(src):
    """`__shared__ T name[N];` -> a function static registered with the
    emulator, which fills it with a poison pattern before every block (on a
    GPU, shared memory starts undefined).  `extern __shared__ T name[];` (the
    launch's dynamic shared memory) -> a pointer to the emulator's buffer of
    the launch's size, poisoned the same way."""
    src = DYN_SHARED.sub(lambda m: "%s *%s = (%s *)aoq_emu::dyn_shared();" % (m.group(1), m.group(2), m.group(1)),
                         src)
    return SHARED.subn(lambda m: "static %s %s%s; static aoq_emu::SharedReg aoq_emu_reg_%s(&%s, sizeof(%s));"
                       % (m.group(1), m.group(2), m.group(3) or "", m.group(2), m.group(2), m.group(2)),
                       src)


def rewrite_launches(src):
    """Replace each CUDA launch by a call of the emulator's launcher; the line
    count does not change (diagnostics keep the .cu line numbers)."""
    return LAUNCH.subn(lambda m: "aoq_emu::launch(%s, %s)(" % (m.group(1), m.group(2)), src)


def build(cu_path, extra_flags=()):
    """Compile cu_path into a shared library for the emulator and load it."""
    cxx = os.environ.get("CXX", "g++")
    with open(cu_path) as f:
        src = f.read()
    body, n = rewrite_launches(src)
    if n == 0:
        raise RuntimeError(f"{cu_path}: no kernel launch found to rewrite")
    if "<<<" in body:
        raise RuntimeError(f"{cu_path}: a launch the rewrite did not understand is left")
    body, _ = rewrite_shared(body)
    if "__shared__" in body:
        raise RuntimeError(f"{cu_path}: a __shared__ declaration the rewrite did not understand is left")
    # -fno-strict-aliasing: the kernels move uint16/float chunks as uint4 words;
    # -U_FORTIFY_SOURCE: the fibers _longjmp between stacks
    flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-U_FORTIFY_SOURCE",
             "-fno-strict-aliasing", "-fPIC", "-shared", "-Wall", "-Werror",
             "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas", "-Wno-unused-function",
             "-DAOQ_WITH_CUDA=1", "-I" + HERE, "-I" + os.path.join(ROOT, "csrc", "kernels"),
             "-I" + os.path.join(ROOT, "csrc"), *extra_flags]
    if os.environ.get("AOQ_EMU_ASAN") == "1":
        # the emulated memcheck: the process must run with libasan preloaded
        # (tests/test_cuda_emu.py::test_emulated_kernels_under_asan)
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-DAOQ_EMU_STACK=32768"]
    with open(os.path.join(HERE, "cuda_runtime.h")) as f:
        runtime = f.read()
    headers = ""
    for h in sorted(os.listdir(os.path.join(ROOT, "csrc", "kernels"))):
        if h.endswith(".h"):
            with open(os.path.join(ROOT, "csrc", "kernels", h)) as f:
                headers += f.read()
    key = hashlib.sha256("\0".join([body, runtime, headers, cxx, *flags]).encode()).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(cu_path))[0]
    os.makedirs(OUT, exist_ok=True)
    lib = os.path.join(OUT, f"{name}_{key}.so")
    if not os.path.exists(lib):
        cpp = os.path.join(OUT, f"{name}_{key}.cpp")
        rel = os.path.relpath(cu_path, ROOT)
        with open(cpp, "w") as f:
            f.write(f'#line 1 "{rel}"\n' + body)
        tmp = lib + f".tmp{os.getpid()}"
        r = subprocess.run([cxx, *flags, "-o", tmp, cpp], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"emulator build of {rel} failed:\n{r.stderr[-6000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)
