"""The CUDA kernels of csrc/kernels/fq_cuda.cu, run on the CPU by the emulator
in tests/cuda_emu/ (fibers for threads, real warp-shuffle and __syncthreads
semantics), compared bit for bit with the CPU kernels of the extension.

This runs the CUDA kernels' own code: their row/warp/lane indexing, the
canonical reduction trees, the vectorized and scalar load paths, the masks
and the launchers' argument checks and device handling.  It does not run
nvcc's code generation or the device intrinsics (aoq_math.h's __CUDA_ARCH__
branches: rintf, the float/uint casts and the fp16 conversions);
tests/test_cuda.py covers those on a GPU.  Division semantics: torchao mode is compared with the CPU kernel
under CUDA's rule (div_mode 1), AWQ modes with the default one (see
test_cuda.py).
"""
import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch

import ao_awq_export  # noqa: F401  (registers torch.ops.ao_awq)
from tests.cuda_emu.build import build, rewrite_launches
from tests.test_fake_quant import assert_bits_equal, make_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SCH = {"fp8_int4": 0, "int4_asym": 1}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
P = ctypes.c_void_p
I64 = ctypes.c_int64
I = ctypes.c_int


@pytest.fixture(scope="module")
def lib():
    # AOQ_EMU_CU: another version of the kernels (a patch under trial) to test
    return setup_lib(build(os.environ.get("AOQ_EMU_CU") or os.path.join(ROOT, "csrc", "kernels", "fq_cuda.cu")))


def setup_lib(lib):
    lib.aoq_cuda_fq_fwd.argtypes = [P, P, P, P, P, I64, I64, I64, I, I, I, I, I, P]
    lib.aoq_cuda_fq_bwd.argtypes = [P, P, P, I64, I64, I64, I, I, I, I, I, I, P]
    lib.aoq_cuda_fp8_rows_fwd.argtypes = [P, P, I64, I64, I, I, I, P]
    lib.aoq_cuda_fp8_rows_bwd.argtypes = [P, P, P, I64, I64, I, I, I, I, P]
    lib.aoq_cuda_pack_awq.argtypes = [P, P, I64, I64, I, P]
    lib.aoq_cuda_last_error.restype = ctypes.c_char_p
    lib.aoq_emu_set_devices.argtypes = [I]
    lib.aoq_emu_set_devices(1)
    lib.aoq_emu_set_order.argtypes = [I]
    lib.aoq_emu_set_smem.argtypes = [I, I, I]
    lib.aoq_emu_last_smem.restype = ctypes.c_size_t
    lib.aoq_cuda_last_stage_bytes.restype = ctypes.c_int64
    return lib


# shared memory of an emulated device, in bytes: per block with opt-in, per
# SM (an H100's, the emulator's default)
EMU_SMEM = (232448, 233472)


def staged_bytes(nbytes, limits=EMU_SMEM):
    """The dynamic shared memory an fp8 launcher must ask for to stage
    `nbytes` of row data: all of it where it fits with two blocks per SM
    (2 KiB of slack per block), else none; none under AOQ_CUDA_STAGE=0."""
    if os.environ.get("AOQ_CUDA_STAGE", "").startswith("0"):
        return 0
    optin, per_sm = limits
    return nbytes if nbytes + 2048 <= optin and 2 * (nbytes + 2048) <= per_sm else 0


def ptr(t):
    return None if t is None else t.data_ptr()


def check(lib, rc):
    assert rc == 0, f"launcher returned {rc}: {lib.aoq_cuda_last_error().decode()}"


def emu_fwd(lib, w, g, scheme, awq, cs, outputs=True, device=0):
    n, k = w.shape
    out = torch.empty_like(w)
    codes = torch.empty(n, k, dtype=torch.uint8) if outputs else None
    scales = torch.empty(n, k // g) if outputs else None
    zeros = torch.empty(n, k // g) if outputs else None
    check(lib, lib.aoq_cuda_fq_fwd(ptr(w), ptr(out), ptr(codes), ptr(scales), ptr(zeros), n, k, g,
                                   DT[w.dtype], SCH[scheme], awq, cs, device, None))
    return out, codes, scales, zeros


def emu_bwd(lib, grad, w, g, scheme, awq, cs, st, gw=None, device=0):
    n, k = w.shape
    gw = torch.empty_like(w) if gw is None else gw
    check(lib, lib.aoq_cuda_fq_bwd(ptr(grad), ptr(w), ptr(gw), n, k, g, DT[w.dtype], SCH[scheme], awq,
                                   cs, st, device, None))
    return gw


def test_launch_rewrite():
    src = ("k<A, B, true><<<(unsigned)N, TPB, 0, st>>>(x, y);\n"
           "pack<<<(unsigned)((t + 255) / 256), 256, 0,\n (cudaStream_t)s>>>(\n c);")
    out, n = rewrite_launches(src)
    assert n == 2 and "<<<" not in out and out.count("\n") == src.count("\n")
    assert out.startswith("aoq_emu::launch(k<A, B, true>, (unsigned)N, TPB, 0, st)(x, y);")


# the GPU test's shapes are cut down (the emulator switches fibers at every
# shuffle); these still cover one row, one group per row, rows whose group
# count is not a multiple of the 8 warps, a row of 28672 elements at g=128
# (the largest shape), and the edge rows of make_weight
CASES = [(1, 1), (9, 3), (8, 16), (2, 17), (2, 224)]  # (rows, groups per row)
if os.environ.get("AOQ_EMU_ASAN") == "1":
    CASES = CASES[:4]  # ASan slows the fibers ~30x: the long row stays in the plain run


@pytest.mark.parametrize("scheme", list(SCH))
@pytest.mark.parametrize("mode", ["torchao", "awq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_emulated_gpu_kernels_equal_cpu(lib, scheme, mode, dtype, g):
    compare_with_cpu(lib, scheme, mode, dtype, g)


@pytest.mark.parametrize("unroll", [(1, 1), (3, 3)], ids=str)
def test_emulated_unroll_variants(unroll):
    """The groups-in-flight knobs (AOQ_U the fp8 row max, AOQ_UF forward
    steps, AOQ_UB / AOQ_UBS backward; 4, 2, 2, 4 by default) change the loop
    structure, never the results."""
    lib = build(os.environ.get("AOQ_EMU_CU") or os.path.join(ROOT, "csrc", "kernels", "fq_cuda.cu"),
                (f"-DAOQ_U={unroll[0]}", f"-DAOQ_UF={unroll[0]}", f"-DAOQ_UB={unroll[1]}",
                 f"-DAOQ_UBS={unroll[1]}"))
    setup_lib(lib)
    if unroll == (1, 1):
        first_launches_just_under_48k(lib)
    for scheme in SCH:
        for mode in ("torchao", "awq"):
            compare_with_cpu(lib, scheme, mode, torch.bfloat16, 64)
            compare_with_cpu(lib, scheme, mode, torch.float32, 256)


def first_launches_just_under_48k(lib):
    """Staged rows of 48384 bytes, each the first launch of its kernel in a
    fresh library: under 48 KiB, but not with the emulator's 1 KiB of static
    shared memory on top, so the launchers must have allowed more.  (On a
    GPU, with these kernels' 32-64 static bytes, the failure starts closer to
    48 KiB: tests/test_cuda.py launches 49152-byte rows for it.)"""
    for fp8_rows, k in ((False, 24192), (True, 24192)):  # forwards: 24192 bf16
        x = make_weight(2, k, torch.bfloat16, 128, seed=5)
        out = torch.empty_like(x)
        if fp8_rows:
            check(lib, lib.aoq_cuda_fp8_rows_fwd(ptr(x), ptr(out), 2, k, DT[x.dtype], 1, 0, None))
            assert_bits_equal(out, torch.ops.ao_awq.fp8_rows(x, False, 1), "rows 48384 bytes")
        else:
            out = emu_fwd(lib, x, 128, "fp8_int4", 0, 1, outputs=False)[0]
            assert_bits_equal(out, torch.ops.ao_awq.fq_weight(x, 128, 0, False, False, 1), "fwd 48384 bytes")
        assert lib.aoq_emu_last_smem() == 48384
    k = 12096  # backwards: 2 x 12096 bf16
    x = make_weight(2, k, torch.bfloat16, 64, seed=6)
    gout = (torch.randn(2, k, generator=torch.Generator().manual_seed(6)) * 1e3).to(torch.bfloat16)
    assert_bits_equal(emu_bwd(lib, gout, x, 64, "fp8_int4", 0, 1, 1),
                      torch.ops.ao_awq.fq_weight_backward(gout, x, 64, 0, False, True, 1), "bwd 48384 bytes")
    assert lib.aoq_emu_last_smem() == 48384
    gx = torch.empty_like(x)
    check(lib, lib.aoq_cuda_fp8_rows_bwd(ptr(gout), ptr(x), ptr(gx), 2, k, DT[x.dtype], 1, 1, 0, None))
    assert_bits_equal(gx, torch.ops.ao_awq.fp8_rows_backward(gout, x, True, 1), "rows bwd 48384 bytes")
    assert lib.aoq_emu_last_smem() == 48384


def compare_with_cpu(lib, scheme, mode, dtype, g, limits=EMU_SMEM, device=0):
    """Every output of both launchers against the CPU ops, on CASES; the fp8
    launchers stage the row in shared memory where it fits (`limits`), and
    that is checked too, so both kernel variants are known to be compared."""
    awq = int(mode == "awq")
    cs = 1 - awq
    fp8 = scheme == "fp8_int4"
    for i, (n, groups) in enumerate(CASES):
        k = groups * g
        w = make_weight(n, k, dtype, g, seed=i)
        out, codes, scales, zeros = emu_fwd(lib, w, g, scheme, awq, cs, device=device)
        what = f"{scheme} {mode} {dtype} g{g} {n}x{k}"
        assert lib.aoq_emu_last_smem() == (staged_bytes(k * w.element_size(), limits) if fp8 else 0), what
        assert lib.aoq_cuda_last_stage_bytes() == lib.aoq_emu_last_smem()  # what the launcher reports
        assert_bits_equal(out, torch.ops.ao_awq.fq_weight(w, g, SCH[scheme], bool(awq), False, cs), what)
        c2, s2, z2 = torch.ops.ao_awq.quantize(w, g, SCH[scheme], bool(awq), cs)
        assert torch.equal(codes, c2), what + " codes"
        assert_bits_equal(scales, s2, what + " scales")
        assert_bits_equal(zeros, z2, what + " zeros")
        gout = (torch.randn(n, k, generator=torch.Generator().manual_seed(i)) * 1e3).to(dtype)
        for st in (0, 1):
            gw = emu_bwd(lib, gout, w, g, scheme, awq, cs, st, device=device)
            assert lib.aoq_emu_last_smem() == (staged_bytes(2 * k * w.element_size(), limits) if fp8 else 0)
            ref = torch.ops.ao_awq.fq_weight_backward(gout, w, g, SCH[scheme], bool(awq), bool(st), cs)
            assert_bits_equal(gw, ref, what + f" grad st={st}")


def test_fast_roundings_over_their_domains(tmp_path):
    """aoq_math.h's fast roundings (the CUDA forward's fast paths) equal the
    general ones on every float of their domains, aoq_div_by (the
    backward's) equals the division on 2^30 quotients, and the fp16 fast
    paths' hardware conversions (IEEE round to nearest even, here the C
    compiler's _Float16) equal aoq_f16_round and aoq_f32_to_f16_bits on every
    float but NaN (tests/fast_paths.c)."""
    exe = tmp_path / "fast_paths"
    # the fp16 check (fq_cuda.cu's hardware conversions against aoq_f16_round
    # and aoq_f32_to_f16_bits) on every float with F16C, else on 1 in 17
    f16c = platform.machine() in ("x86_64", "AMD64") and os.path.exists("/proc/cpuinfo") and \
        " f16c" in open("/proc/cpuinfo").read()
    subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-ffp-contract=off", "-I" + os.path.join(ROOT, "csrc"),
                    *(["-mf16c"] if f16c else []), "-o", str(exe), os.path.join(ROOT, "tests", "fast_paths.c"),
                    "-lm"], check=True)
    h_stride = 1 if f16c else 17
    r = subprocess.run([str(exe), "1", str(h_stride)], capture_output=True, text=True)
    assert r.returncode == 0 and "6236930052 floats checked, 0 mismatches" in r.stdout, r.stdout
    assert "1073741826 divisions checked, 0 mismatches" in r.stdout, r.stdout
    assert f"{2 * (0x7f800000 // h_stride + 1)} fp16 conversions checked, 0 mismatches" in r.stdout, r.stdout


@pytest.mark.parametrize("scheme", list(SCH))
def test_emulated_forward_general_code_only(lib, scheme, monkeypatch):
    """AOQ_CUDA_FAST=0: every group through the forward's general code."""
    monkeypatch.setenv("AOQ_CUDA_FAST", "0")
    path_counts(lib)
    for mode in ("torchao", "awq"):
        for dtype, g in ((torch.bfloat16, 64), (torch.float16, 32), (torch.float32, 256)):
            compare_with_cpu(lib, scheme, mode, dtype, g)
    fast, general = path_counts(lib)
    assert fast == 0 and general > 0, (fast, general)


def midpoint_weight():
    """2 fp32 rows of amax 1 (scale s = fp32(1 / 448)) holding fp32(m * s)
    for every e4m3 midpoint m, their negatives and their float neighbours."""
    s = torch.tensor(1.0) / 448
    mids = [(j + 0.5) * 2.0 ** -9 for j in range(8)]
    mids += [(8 + j + 0.5) * 2.0 ** (e - 3) for e in range(-6, 9) for j in range(8)
             if (8 + j + 0.5) * 2.0 ** (e - 3) < 448]
    x = (torch.tensor(mids, dtype=torch.float64) * s.double()).float()
    vals = torch.cat([x, -x, x.nextafter(torch.tensor(1.0)), x.nextafter(torch.tensor(0.0))])
    k = -(-(vals.numel() + 1) // 32) * 32
    w = torch.zeros(2, k)
    w[0, 0] = 1.0
    w[0, 1:1 + vals.numel()] = vals
    w[1] = w[0].flip(0)
    return w


@pytest.mark.parametrize("mode", ["torchao", "awq"])
def test_emulated_fp8_values_near_e4m3_midpoints(lib, mode):
    """The fp8 fast path rounds x * (1 / s) instead of x / s to e4m3, except
    for lanes holding a value within a few float ulps of an e4m3 midpoint,
    which divide.  fp32 weights x = fp32(m * s) for every e4m3 midpoint m (s
    = fp32(1 / 448), the scale of a row whose amax is 1) put x / s within an
    ulp of each m: against the CPU kernel, and the lanes must have divided."""
    awq = int(mode == "awq")
    w = midpoint_weight()
    ctypes.c_int64.in_dll(lib, "aoq_emu_divided_lanes").value = 0
    out, codes, scales, zeros = emu_fwd(lib, w, 32, "fp8_int4", awq, 1 - awq)
    assert ctypes.c_int64.in_dll(lib, "aoq_emu_divided_lanes").value > 0
    assert_bits_equal(out, torch.ops.ao_awq.fq_weight(w, 32, 0, bool(awq), False, 1 - awq), mode)
    c2, s2, z2 = torch.ops.ao_awq.quantize(w, 32, 0, bool(awq), 1 - awq)
    assert torch.equal(codes, c2) and torch.equal(scales, s2) and torch.equal(zeros, z2)


@pytest.mark.parametrize("cs", [0, 1])
def test_emulated_fp8_rows_near_e4m3_midpoints(lib, cs):
    """The same values through the fp8 activation rows' forward (its fast
    rows take the same reciprocal rounding and dividing lanes)."""
    w = midpoint_weight()
    n, k = w.shape
    out = torch.empty_like(w)
    ctypes.c_int64.in_dll(lib, "aoq_emu_divided_lanes").value = 0
    check(lib, lib.aoq_cuda_fp8_rows_fwd(ptr(w), ptr(out), n, k, 0, cs, 0, None))
    assert ctypes.c_int64.in_dll(lib, "aoq_emu_divided_lanes").value > 0
    assert_bits_equal(out, torch.ops.ao_awq.fp8_rows(w, False, cs), f"rows cs={cs}")


def special_weight(dtype, g):
    """8 rows of 8 groups, each row with values that the forward's fast paths
    must leave to the general code, beside groups they take: 0 plain; 1 a
    NaN; 2 a +Inf; 3 a -Inf; 4 a row amax past the fp8 fast bound (fp16:
    20000 > 16384; else 2^101); 5 a group spanning -M..M (M = 3e38: its range
    overflows to Inf; fp16: 60000); 6 a group of range 2e6 (its AWQ fp16
    scale overflows; fp16 weights cannot reach that); 7 tiny values (1e-30:
    the fp16 row scale underflows to 0).  Row 0's third group is small (fp16:
    its scale's reciprocal overflows, in a fast row)."""
    w = make_weight(8, 8 * g, torch.float32, g, seed=11, special=False)
    f16 = dtype == torch.float16
    w[1, 3] = float("nan")
    w[2, g + 5] = float("inf")
    w[3, 2 * g] = float("-inf")
    w[4] *= (2e4 if f16 else 2.0 ** 101) / w[4].abs().max()
    w[5, 0], w[5, 1] = (6e4, -6e4) if f16 else (3e38, -3e38)
    w[6, g:2 * g] *= 1e6 / w[6, g:2 * g].abs().max()
    w[7] *= 1e-30
    w[0, 2 * g:3 * g] *= 2e-4
    return w.to(dtype)


def path_counts(lib):
    """(fast, general): the forward's groups per path since the last call
    (counted by the emulator build of the kernels)."""
    f = ctypes.c_int64.in_dll(lib, "aoq_emu_fast_groups")
    gen = ctypes.c_int64.in_dll(lib, "aoq_emu_general_groups")
    r = (f.value, gen.value)
    f.value = gen.value = 0
    return r


@pytest.mark.parametrize("scheme", list(SCH))
@pytest.mark.parametrize("mode", ["torchao", "awq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_forward_fast_and_general_paths(lib, scheme, mode, dtype):
    """The forward's fast paths (rows and groups shown finite and in range
    once) and its general code, against the CPU kernels: plain weights take
    only the fast path, special_weight's rows make both run."""
    g = 64
    awq = int(mode == "awq")
    cs = 1 - awq
    path_counts(lib)
    for special in (False, True):
        w = special_weight(dtype, g) if special else make_weight(4, 8 * g, dtype, g, seed=3, special=False)
        what = f"{scheme} {mode} {dtype} special={special}"
        out, codes, scales, zeros = emu_fwd(lib, w, g, scheme, awq, cs)
        fast, general = path_counts(lib)
        assert fast + general == w.numel() // g, what
        if special:
            assert fast > 0 and general > 0, (what, fast, general)
        else:
            assert general == 0, (what, fast, general)
        assert_bits_equal(out, torch.ops.ao_awq.fq_weight(w, g, SCH[scheme], bool(awq), False, cs), what)
        c2, s2, z2 = torch.ops.ao_awq.quantize(w, g, SCH[scheme], bool(awq), cs)
        assert torch.equal(codes, c2), what + " codes"
        assert_bits_equal(scales, s2, what + " scales")
        assert_bits_equal(zeros, z2, what + " zeros")
        if special:  # the backward's row max (fp8) sees these rows too
            gout = (torch.randn(w.shape, generator=torch.Generator().manual_seed(2)) * 1e3).to(dtype)
            ref = torch.ops.ao_awq.fq_weight_backward(gout, w, g, SCH[scheme], bool(awq), True, cs)
            assert_bits_equal(emu_bwd(lib, gout, w, g, scheme, awq, cs, 1), ref, what + " grad")


def bwd_path_counts(lib):
    """(fast, general): the backward's groups per path since the last call."""
    f = ctypes.c_int64.in_dll(lib, "aoq_emu_bwd_fast_groups")
    gen = ctypes.c_int64.in_dll(lib, "aoq_emu_bwd_general_groups")
    r = (f.value, gen.value)
    f.value = gen.value = 0
    return r


def bwd_edge_rows(n, g, seed, glo, ghi):
    """fp32 weights and gradients, n rows of 8 groups, for the backward's
    edge cases: in element j of group 3, row 1 a weight of 2^-41 (past the
    lanes' 2^-40), row 2 one of -2^-40 (at it), rows 3-6 gradients just past
    and at 2^glo and 2^ghi; zeros of both signs in group 3 of every row (a
    fast zero keeps its sign).  Returns (w, G, j)."""
    w = make_weight(n, 8 * g, torch.float32, g, seed=seed, special=False)
    G = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1))
    j = 3 * g + 7
    w[1, j], w[2, j] = 2.0 ** -41, -(2.0 ** -40)
    G[3, j], G[4, j] = 2.0 ** (glo - 1), -(2.0 ** glo)
    G[5, j], G[6, j] = -(2.0 ** (ghi + 1)), 2.0 ** ghi
    w[:, 3 * g + 1], w[:, 3 * g + 2] = 0.0, -0.0
    G[:, 3 * g + 1], G[:, 3 * g + 4] = -0.0, 0.0
    return w, G, j


def asym_bwd_edge_case(dtype, g):
    """Rows of 8 groups for the int4-asym backward's fast domain (weights 0
    or within [2^-40, 2^60], gradients 0 or in [2^-70, 2^70], scale at most
    2^24),
    each with its group 3 (row 9: group 1) at or just past an edge, and the
    rows' expected numbers of general groups: the 4 groups of a warp step
    (groups 0-3 of a row) take the same path."""
    w, G, j = bwd_edge_rows(10, g, 5, -70, 70)
    w[7, 3 * g:4 * g] *= 2.0 ** 33  # range about 2^31: scale past 2^24
    G[8, j] = float("nan")
    w[9, g:2 * g] = 2.0 ** 100  # a constant group past the weights' 2^60 (awq: x / s16 / s16 overflows)
    general = [4 * k for k in (0, 1, 0, 1, 0, 1, 0, 1, 1, 1)]  # (a warp's 4 groups decide together)
    return w.to(dtype), G.to(dtype), general


def fp8_bwd_edge_case(dtype, g, awq):
    """Rows of 8 groups for the fp8-int4 backward's fast domain (rows: amax
    at most fast_amax and scale in [2^-24, 2^24]; lanes: weights 0 or at
    least 2^-40, gradients 0 or in [2^-60, 2^40]; groups: finite 1 / sg and
    dequantizing scale), each row's group 3 at or just past an edge, or the
    whole row; and the rows' expected numbers of general groups: the groups
    of a warp step (g = 64: 4, groups 0-3 of a row) take the same path."""
    assert g == 64
    w, G, j = bwd_edge_rows(11, g, 7, -60, 40)
    w[7] *= 2.0 ** 34 / w[7].abs().max()  # row scale past 2^24
    w[8] *= 1e-5 / w[8].abs().max()  # row scale below 2^-24
    G[9, j] = float("nan")
    w[10, 3 * g:4 * g] *= 1e6 / w[10, 3 * g:4 * g].abs().max()  # group scale past fp16's range
    general = [0, 4, 0, 4, 0, 4, 0, 8, 8, 4, 4 * awq]  # (a warp's 4 groups decide together)
    return w.to(dtype), G.to(dtype), general


@pytest.mark.parametrize("scheme", list(SCH))
@pytest.mark.parametrize("mode", ["torchao", "awq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_backward_fast_and_general_paths(lib, scheme, mode, dtype):
    """The backward's fast groups (aoq_div_by for the divisions by a group's
    or row's scale; fp8: the fast roundings, no NaN handling) against the CPU
    kernel: plain weights take only the fast path, special_weight's rows and
    the groups and rows at or just past each edge of the domain both (fp16
    can hold none of the edges but the NaN)."""
    g = 64
    awq = int(mode == "awq")
    cs = 1 - awq
    bwd_path_counts(lib)
    plain = make_weight(4, 8 * g, dtype, g, seed=3, special=False)
    gplain = (torch.randn(plain.shape, generator=torch.Generator().manual_seed(4)) * 1e3).to(dtype)
    gplain[0, :9] = torch.tensor([0.0, -0.0] * 4 + [-0.0])
    cases = [("plain", plain, gplain, 0)]
    sw = special_weight(dtype, g)
    cases.append(("special", sw, (torch.randn(sw.shape, generator=torch.Generator().manual_seed(2)) * 1e3
                                  ).to(dtype), None))
    if dtype != torch.float16:
        w, G, general = fp8_bwd_edge_case(dtype, g, awq) if scheme == "fp8_int4" else asym_bwd_edge_case(dtype, g)
        cases.append(("edges", w, G, sum(general)))
    for name, w, G, want_general in cases:
        what = f"{scheme} {mode} {dtype} {name}"
        for st in (0, 1):
            gw = emu_bwd(lib, G, w, g, scheme, awq, cs, st)
            fast, general = bwd_path_counts(lib)
            if want_general is None:  # (fp8, fp16: row 7's scale underflows to 0, a row of zero gradients)
                assert fast > 0 and general > 0, (what, fast, general)
            else:
                assert (fast + general, general) == (w.numel() // g, want_general), (what, fast, general)
            ref = torch.ops.ao_awq.fq_weight_backward(G, w, g, SCH[scheme], bool(awq), bool(st), cs)
            assert_bits_equal(gw, ref, what + f" grad st={st}")


@pytest.mark.parametrize("scheme", list(SCH))
def test_emulated_backward_general_code_only(lib, scheme, monkeypatch):
    """AOQ_CUDA_FAST=0: every group of the backward through its general code."""
    monkeypatch.setenv("AOQ_CUDA_FAST", "0")
    bwd_path_counts(lib)
    for mode in ("torchao", "awq"):
        awq = int(mode == "awq")
        for dtype, g in ((torch.bfloat16, 64), (torch.float16, 32), (torch.float32, 128)):
            w = make_weight(3, 4 * g, dtype, g, seed=8, special=True)
            G = (torch.randn(w.shape, generator=torch.Generator().manual_seed(9)) * 1e3).to(dtype)
            ref = torch.ops.ao_awq.fq_weight_backward(G, w, g, SCH[scheme], bool(awq), True, 1 - awq)
            assert_bits_equal(emu_bwd(lib, G, w, g, scheme, awq, 1 - awq, 1), ref, f"{mode} {dtype}")
    fast, general = bwd_path_counts(lib)
    assert fast == 0 and general > 0, (fast, general)


@pytest.mark.parametrize("mode", ["torchao", "awq"])
def test_emulated_unstaged(lib, mode, monkeypatch):
    """AOQ_CUDA_STAGE=0: the fp8 kernels that read the row again from global
    memory instead of shared memory (the fallback for rows that do not fit)."""
    monkeypatch.setenv("AOQ_CUDA_STAGE", "0")
    for dtype, g in ((torch.bfloat16, 64), (torch.float16, 32), (torch.float32, 256)):
        compare_with_cpu(lib, "fp8_int4", mode, dtype, g)
    if mode == "torchao":
        for dtype in DTYPES:
            check_fp8_rows(lib, dtype)
            check_fp8_row_tail(lib, dtype)


def test_emulated_stage_limit(lib):
    """A device with little shared memory (emulated device 2): the short rows
    are staged, the long ones take the fallback, and the results stay the
    same."""
    limits = (10240, 20480)
    lib.aoq_emu_set_devices(3)
    lib.aoq_emu_set_smem(2, *limits)  # device 2 serves only this test
    try:
        compare_with_cpu(lib, "fp8_int4", "torchao", torch.bfloat16, 128, limits, device=2)
        compare_with_cpu(lib, "fp8_int4", "awq", torch.float32, 32, limits, device=2)
        x = torch.randn(3, 3000).to(torch.bfloat16)
        out = torch.empty_like(x)
        for k, staged in ((3000, 6000), (1000, 2000)):  # rows of 3000 bf16: 6000 bytes
            check(lib, lib.aoq_cuda_fp8_rows_fwd(ptr(x), ptr(out), 3, k, DT[x.dtype], 1, 2, None))
            assert lib.aoq_emu_last_smem() == staged
            check(lib, lib.aoq_cuda_fp8_rows_bwd(ptr(x), ptr(x), ptr(out), 3, k, DT[x.dtype], 1, 0, 2, None))
            assert lib.aoq_emu_last_smem() == (0 if k == 3000 else 2 * staged)
    finally:
        lib.aoq_emu_set_devices(1)


def test_emulated_stage_allowance_per_device(lib):
    """A kernel's shared-memory allowance belongs to one device: a staged row
    over 48 KiB on device 0, then on device 1, must each get one."""
    w = make_weight(2, 28672, torch.bfloat16, 128, seed=8)  # 57344 bytes a row
    ref = torch.ops.ao_awq.fq_weight(w, 128, 0, False, False, 1)
    lib.aoq_emu_set_devices(2)
    try:
        for device in (0, 1):
            out = emu_fwd(lib, w, 128, "fp8_int4", 0, 1, outputs=False, device=device)[0]
            assert lib.aoq_emu_last_smem() == 57344
            assert_bits_equal(out, ref, f"device {device}")
    finally:
        lib.aoq_emu_set_devices(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_fp8_rows(lib, dtype):
    check_fp8_rows(lib, dtype)


def fp8_rows_case(dtype, k, seed):
    """9 rows of k: random, a zero row, a row with one large value (the
    others flushed), a NaN row, a +Inf row, a row past the fast bound (fp16:
    amax 20000 > 16384; else 2^101), a tiny row (fp16: its scale underflows),
    two random rows of other scales.  k a multiple of 16 bytes of elements
    (8 for bf16/fp16, 4 for fp32): the vectorized forward (fast rows and the
    general code's); else (302) the scalar kernel."""
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(seed)) * 3
    f16 = dtype == torch.float16
    x[1] = 0
    x[2, 7] = 1e4 if not f16 else 6e4
    x[3, 5] = float("nan")
    x[4, k - 1] = float("inf")
    x[5] *= (2e4 if f16 else 2.0 ** 101) / x[5].abs().max()
    x[6] *= 5e-7 if f16 else 1e-30  # fp16: nonzero values, the scale underflows (signed zeros)
    x[7] *= 1e-3
    x[8] *= 300
    return x.to(dtype)


def check_fp8_rows(lib, dtype):
    """Forward under both division rules, for a length that takes the
    vectorized kernel and one that does not; the backward under CUDA's, the
    one the GPU runs (the CPU's rule sums in torch's CPU order, see fq_cpu.c)."""
    for cs in (0, 1):
        for k in (302, 304):
            x = fp8_rows_case(dtype, k, cs)
            n = x.shape[0]
            out = torch.empty_like(x)
            check(lib, lib.aoq_cuda_fp8_rows_fwd(ptr(x), ptr(out), n, k, DT[dtype], cs, 0, None))
            assert lib.aoq_emu_last_smem() == staged_bytes(k * x.element_size())
            assert_bits_equal(out, torch.ops.ao_awq.fp8_rows(x, False, cs), f"rows {dtype} k={k} cs={cs}")
            xu = torch.empty(n * k + 1, dtype=dtype)[1:].view(n, k)  # not 16-byte aligned: the scalar kernel
            xu.copy_(x)
            out = torch.empty_like(x)
            check(lib, lib.aoq_cuda_fp8_rows_fwd(ptr(xu), ptr(out), n, k, DT[dtype], cs, 0, None))
            assert_bits_equal(out, torch.ops.ao_awq.fp8_rows(x, False, cs), f"rows {dtype} k={k} unaligned")
            g = (torch.randn(n, k, generator=torch.Generator().manual_seed(5)) * 100).to(dtype)
            for st in (0, 1) if cs else ():
                gx = torch.empty_like(x)
                check(lib, lib.aoq_cuda_fp8_rows_bwd(ptr(g), ptr(x), ptr(gx), n, k, DT[dtype], cs, st, 0, None))
                assert_bits_equal(gx, torch.ops.ao_awq.fp8_rows_backward(g, x, bool(st), cs),
                                  f"rows grad {dtype} k={k} cs={cs} st={st}")


def rows_bwd_cases(dtype):
    """(name, x, gradient) for the fp8 rows' backward: plain rows (every
    element on the fast path), fp8_bwd_edge_case's rows (elements at and just
    past each edge of the fast domain, rows past it; fp16 holds none of the
    edges but the NaN) and fp8_rows_case's (zero, NaN, Inf rows)."""
    x = (torch.randn(4, 512, generator=torch.Generator().manual_seed(8)) * 0.05).to(dtype)
    gx = (torch.randn(4, 512, generator=torch.Generator().manual_seed(9)) * 1e3).to(dtype)
    gx[0, :9] = torch.tensor([0.0, -0.0] * 4 + [-0.0])
    cases = [("plain", x, gx)]
    if dtype != torch.float16:
        w, G, _ = fp8_bwd_edge_case(dtype, 64, 0)
        cases.append(("edges", w, G))
    if dtype != torch.float16:
        # x below the element domain (2^-40) in a fast row, where aoq_div_by
        # (x / s_row) would be wrong: found by an independent review, these
        # rows fail if every element of a fast row takes the fast path
        xt, gt = torch.zeros(2, 256), torch.zeros(2, 256)
        xt[0, :2] = torch.tensor([float.fromhex("0x1.d09eecp-16"), float.fromhex("0x1.b021p-133")])
        gt[0, 1] = float.fromhex("0x1.edaf2cp+21")
        xt[1, :3] = torch.tensor([float.fromhex("0x1.88p-12"), float.fromhex("0x1.3p-126"),
                                  float.fromhex("0x1.4ap-125")])
        gt[1, 1:3] = torch.tensor([float.fromhex("0x1.6ep+23"), float.fromhex("0x1.6ep+18")])
        cases.append(("tiny x", xt.to(dtype), gt.to(dtype)))
    xr = fp8_rows_case(dtype, 304, 1)
    cases.append(("special", xr, (torch.randn(xr.shape, generator=torch.Generator().manual_seed(5)) * 100
                                  ).to(dtype)))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_fp8_rows_backward_paths(lib, dtype):
    """The rows' backward takes its fast path element by element (aoq_div_by
    for the divisions by the row scale, the fast e4m3 roundings) and its last
    step's fast form in fast rows: against the CPU kernel (CUDA's division
    rule, both clamp rules); plain rows all fast, the edge cases both paths."""
    for name, x, G in rows_bwd_cases(dtype):
        n, k = x.shape
        bwd_path_counts(lib)
        for st in (0, 1):
            gx = torch.empty_like(x)
            check(lib, lib.aoq_cuda_fp8_rows_bwd(ptr(G), ptr(x), ptr(gx), n, k, DT[dtype], 1, st, 0, None))
            assert_bits_equal(gx, torch.ops.ao_awq.fp8_rows_backward(G, x, bool(st), 1),
                              f"rows grad {name} {dtype} st={st}")
        fast, general = bwd_path_counts(lib)
        assert fast > 0 and (general == 0) == (name == "plain"), (name, fast, general)


def rows_layout_cases(dtype):
    """(k, x, gradient) for the rows backward's chunks of 16 bytes (thread t:
    chunks t, t + 256, ..., two in flight): rows shorter than a chunk, rows of
    more chunks than threads (the second chunk in flight, a short last
    chunk), one extreme among flushed values, zero gradients, NaN and Inf
    gradients in a fast row (whose `each` is then NaN: the last step's
    general code), and an fp16 fast row whose gradients overflow to Inf
    (s_row = 2^-24, gradient +-65504 at x = 0: Inf halves through the last
    step's words, PackedFix)."""
    v = 16 // torch.empty(0, dtype=dtype).element_size()
    for k in (3, v, 2 * 256 * v + 3 * v, 2 * 256 * v + 3 * v + 2, 3 * 256 * v):
        gen = torch.Generator().manual_seed(k)
        x = (torch.randn(3, k, generator=gen) * 2).to(dtype)
        G = (torch.randn(3, k, generator=gen) * 100).to(dtype)
        x[1, k // 2] = 1e4 if dtype != torch.float16 else 6e4  # one extreme, the rest flushed
        G[2, :: 7] = 0.0
        G[0, k // 3], G[0, k - 1] = float("nan"), float("-inf")  # in a fast row
        yield k, x, G
    if dtype == torch.float16:
        for k in (8, 2 * 256 * v):
            # amax 448 * 2^-24: s_row = 2^-24 (a fast row); gt = e4m3(+-65504 * 2^-24)
            # over s_row overflows fp16 where x = 0
            x = torch.zeros(3, k)
            x[:, 1] = 448 * 2.0 ** -24
            x[:, 2::3] = 2.0 ** -20
            G = torch.zeros(3, k)
            G[:, 0::2] = 65504.0
            G[1, 0::4] = -65504.0
            yield k, x.to(dtype), G.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", ["1", "0"])
def test_emulated_fp8_rows_backward_layouts(lib, dtype, stage, monkeypatch):
    """rows_layout_cases in aligned buffers (vector loads where 16 bytes
    divide the row) and unaligned ones (element by element, the same chunks
    and sum order), staged and not, against the CPU kernel (CUDA's division
    rule, both clamp rules)."""
    monkeypatch.setenv("AOQ_CUDA_STAGE", stage)
    for k, x, G in rows_layout_cases(dtype):
        for st in (0, 1):
            ref = torch.ops.ao_awq.fp8_rows_backward(G, x, bool(st), 1)
            for off in (0, 1):  # off 1: none of the three buffers 16-byte aligned
                xa, Ga, gx = (torch.empty(3 * k + off, dtype=dtype)[off:].view(3, k) for _ in range(3))
                xa.copy_(x)
                Ga.copy_(G)
                check(lib, lib.aoq_cuda_fp8_rows_bwd(ptr(Ga), ptr(xa), ptr(gx), 3, k, DT[dtype], 1, st, 0, None))
                assert lib.aoq_emu_last_smem() == (staged_bytes(2 * k * x.element_size()) if stage == "1" else 0)
                assert_bits_equal(gx, ref, f"rows grad {dtype} k={k} st={st} off={off} stage={stage}")


def row_tail_case(dtype):
    """(g, w, gout) for the fp8 row backwards' last step (also test_cuda.py)."""
    g, n, k = 64, 6, 640
    w = make_weight(n, k, dtype, g, seed=7, special=False)
    w[0] = torch.where(torch.arange(k) % 3 == 0, -0.5, 0.5).to(dtype)  # 640 extremes
    w[1, 5] = 2.0                                                       # one extreme
    w[2] *= 1e-6                                                        # gradients flushed to +-0 by fp8
    gout = (torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 1e3).to(dtype)
    gout[3] = -0.0                                                      # every stored gradient -0
    gout[4, ::7] = -0.0
    gout[5, 9] = float("nan")                                           # NaN reaches `each`: whole row NaN
    return g, w, gout


def every_f16_case():
    """Every fp16 bit pattern (zeros, subnormals, normals, +-Inf, NaNs), as
    256 rows of 256: w in order (row r holds the patterns 256r .. 256r+255,
    so most rows span one binade or two and rows 124-127, 252-255 hold Inf
    and NaN), w2 and the gradient G shuffled, NaN and Inf replaced by 0.5 in
    w2 (rows of every magnitude that the fast paths may take) and kept in G;
    G2 is G with them replaced by 0.25 (G's rows nearly all hold one, which
    sends a row's backward to the general code; G2's may take the fast one).
    On a GPU every conversion to and from fp16 is the hardware's (aoq_math.h);
    the emulator and the CPU run the integer code."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    w = bits.view(torch.float16).reshape(256, 256).clone()
    perm = torch.randperm(65536, generator=torch.Generator().manual_seed(3))
    w2 = bits[perm].view(torch.float16).reshape(256, 256).clone()
    w2[~torch.isfinite(w2)] = 0.5
    G = bits[perm.flip(0)].view(torch.float16).reshape(256, 256).clone()
    G2 = torch.where(torch.isfinite(G), G, torch.tensor(0.25, dtype=torch.float16))
    return w, w2, G, G2


def f16_cases(run):
    """run(kind, *args) -> (ours, reference) pairs for every_f16_case's
    tensors, through each fp16 kernel (forward and its codes, scales and
    zeros; backward; the fp8 rows), compared bit for bit (NaN where NaN)."""
    w, w2, G, G2 = every_f16_case()
    n = 0
    for x in (w, w2):
        for scheme in SCH:
            for awq in (0, 1):
                cs = 1 - awq
                for got, ref, what in run("fwd", x, 64, scheme, awq, cs):
                    assert_bits_equal(got, ref, f"{what} {scheme} awq={awq}")
                    n += 1
                for gi, gr in enumerate((G, G2)):
                    for st in (0, 1):
                        got, ref = run("bwd", gr, x, 64, scheme, awq, cs, st)
                        assert_bits_equal(got, ref, f"grad {scheme} awq={awq} st={st} G{gi + 1}")
                        n += 1
        for gr in (G, G2):
            for got, ref, what in run("rows", x, gr):
                assert_bits_equal(got, ref, what)
                n += 1
    return n


def emu_f16_run(lib):
    def run(kind, *a):
        if kind == "fwd":
            x, g, scheme, awq, cs = a
            out, codes, scales, zeros = emu_fwd(lib, x, g, scheme, awq, cs)
            ref = torch.ops.ao_awq.fq_weight(x, g, SCH[scheme], bool(awq), False, cs)
            c2, s2, z2 = torch.ops.ao_awq.quantize(x, g, SCH[scheme], bool(awq), cs)
            return [(out, ref, "out"), (codes.float(), c2.float(), "codes"),
                    (scales, s2, "scales"), (zeros, z2, "zeros")]
        if kind == "bwd":
            G, x, g, scheme, awq, cs, st = a
            return (emu_bwd(lib, G, x, g, scheme, awq, cs, st),
                    torch.ops.ao_awq.fq_weight_backward(G, x, g, SCH[scheme], bool(awq), bool(st), cs))
        x, G = a
        out, gx = torch.empty_like(x), torch.empty_like(x)
        check(lib, lib.aoq_cuda_fp8_rows_fwd(ptr(x), ptr(out), 256, 256, 1, 1, 0, None))
        check(lib, lib.aoq_cuda_fp8_rows_bwd(ptr(G), ptr(x), ptr(gx), 256, 256, 1, 1, 1, 0, None))
        return [(out, torch.ops.ao_awq.fp8_rows(x, False, 1), "rows"),
                (gx, torch.ops.ao_awq.fp8_rows_backward(G, x, True, 1), "rows grad")]
    return run


def test_emulated_every_f16_value(lib):
    bwd_path_counts(lib)
    assert f16_cases(emu_f16_run(lib)) == 2 * (4 * (4 + 4) + 4)
    fast, general = bwd_path_counts(lib)
    assert fast > 1000 and general > 1000, (fast, general)  # both backward paths ran


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_fp8_row_tail(lib, dtype):
    check_fp8_row_tail(lib, dtype)


def check_fp8_row_tail(lib, dtype):
    """The last step of the fp8 row backwards (the row max's gradient added to
    the extremes, a signed zero to every other element, which turns a stored
    -0 into +0 by the sign of that gradient): rows with hundreds of extremes,
    with every or every 7th upstream gradient -0, with gradients that fp8
    flushes to +-0, and with a NaN that makes the row NaN."""
    g, w, gout = row_tail_case(dtype)
    n, k = w.shape
    for st in (0, 1):
        gw = emu_bwd(lib, gout, w, g, "fp8_int4", 0, 1, st)
        assert_bits_equal(gw, torch.ops.ao_awq.fq_weight_backward(gout, w, g, 0, False, bool(st), 1),
                          f"fp8_int4 row tail {dtype} st={st}")
        assert gw[5].isnan().all()
        gx = torch.empty_like(w)
        check(lib, lib.aoq_cuda_fp8_rows_bwd(ptr(gout), ptr(w), ptr(gx), n, k, DT[dtype], 1, st, 0, None))
        assert_bits_equal(gx, torch.ops.ao_awq.fp8_rows_backward(gout, w, bool(st), 1),
                          f"rows row tail {dtype} st={st}")
    assert (gw[3] == 0).all() and int(torch.signbit(gw[3].float()).sum()) > 0


def test_emulated_pack(lib):
    c = torch.randint(0, 16, (64, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = torch.empty(40, 8, dtype=torch.int32)
    check(lib, lib.aoq_cuda_pack_awq(ptr(c), ptr(packed), 64, 40, 0, None))
    assert torch.equal(packed, torch.ops.ao_awq.pack_awq(c))


@pytest.mark.parametrize("scheme", list(SCH))
def test_emulated_unaligned_takes_scalar_path(lib, scheme):
    """A buffer 2 bytes off 16-byte alignment: the launcher must pick the
    scalar loads (the emulator reports a misaligned vector access as the GPU
    would) and give the aligned results."""
    g, n, k = 128, 9, 384
    w = make_weight(n, k, torch.bfloat16, g, seed=2)
    base = torch.empty(n * k + 1, dtype=torch.bfloat16)
    wu = base[1:].view(n, k)
    wu.copy_(w)
    assert wu.data_ptr() % 16 != 0
    outs_u = emu_fwd(lib, wu, g, scheme, 0, 1)
    outs_a = emu_fwd(lib, w, g, scheme, 0, 1)
    for a, b in zip(outs_u, outs_a):
        assert torch.equal(a, b)
    gout = torch.randn(n, k).to(torch.bfloat16)
    gbase = torch.empty(n * k + 1, dtype=torch.bfloat16)
    bwd_path_counts(lib)
    gw = emu_bwd(lib, gout, wu, g, scheme, 0, 1, 0, gw=gbase[1:].view(n, k))
    fast, general = bwd_path_counts(lib)
    assert fast == 0 and general > 0, (fast, general)  # (the unaligned kernels keep to the general code)
    assert torch.equal(gw, emu_bwd(lib, gout, w, g, scheme, 0, 1, 0))
    fast, general = bwd_path_counts(lib)
    assert fast > 0, (fast, general)


@pytest.mark.parametrize("scheme", list(SCH))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulated_no_race_thread_order(lib, scheme, dtype):
    """Every kernel gives the same bits whatever order the threads of a block
    run in between barriers (descending, random): no data race the schedule
    could expose (the emulator's stand-in for racecheck)."""
    g, n = 64, 9
    w = make_weight(n, 17 * g, dtype, g, seed=4)
    gout = (torch.randn(n, 17 * g, generator=torch.Generator().manual_seed(4)) * 1e3).to(dtype)
    # activation rows: 700 (16-bit dtypes element by element, fp32 in vectors) and
    # 2056 (vectors for every dtype, more 16-byte chunks than threads for 16-bit)
    xs = [(torch.randn(4, k, generator=torch.Generator().manual_seed(4)) * 3).to(dtype) for k in (700, 2056)]
    codes = torch.randint(0, 16, (64, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))

    smem = []

    def run_all():
        res = list(emu_fwd(lib, w, g, scheme, 0, 1))
        smem.append(lib.aoq_emu_last_smem())
        res.append(emu_bwd(lib, gout, w, g, scheme, 1, 0, 1))
        smem.append(lib.aoq_emu_last_smem())
        for x in xs:
            k, gx = x.shape[1], (x * 7).to(dtype)
            rows, grows = torch.empty_like(x), torch.empty_like(x)
            check(lib, lib.aoq_cuda_fp8_rows_fwd(ptr(x), ptr(rows), 4, k, DT[dtype], 1, 0, None))
            smem.append(lib.aoq_emu_last_smem())
            check(lib, lib.aoq_cuda_fp8_rows_bwd(ptr(gx), ptr(x), ptr(grows), 4, k, DT[dtype], 1, 1, 0, None))
            smem.append(lib.aoq_emu_last_smem())
            res += [rows, grows]
        packed = torch.empty(24, 8, dtype=torch.int32)
        check(lib, lib.aoq_cuda_pack_awq(ptr(codes), ptr(packed), 64, 24, 0, None))
        return res + [packed]

    try:
        for stage in ("1", "0"):  # the fp8 kernels staged in shared memory, and not
            os.environ["AOQ_CUDA_STAGE"] = stage
            lib.aoq_emu_set_order(0)
            smem.clear()
            base = run_all()
            es = w.element_size() * (stage == "1")  # fwd, bwd of the weight; fwd, bwd of x
            assert smem == [17 * g * es * (scheme == "fp8_int4"), 2 * 17 * g * es * (scheme == "fp8_int4"),
                            700 * es, 2 * 700 * es, 2056 * es, 2 * 2056 * es]
            for order in (1, 2, 2):
                lib.aoq_emu_set_order(order)
                for a, b in zip(run_all(), base):
                    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"thread order {order}"
    finally:
        lib.aoq_emu_set_order(0)
        os.environ.pop("AOQ_CUDA_STAGE", None)


def _asan_preload():
    """libasan, and libstdc++ beside it (python does not link libstdc++, and
    ASan must see its __cxa_throw at start-up, or torch's first C++ exception
    stops the process)."""
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        r = subprocess.run([os.environ.get("CXX", "g++"), f"-print-file-name={name}"],
                           capture_output=True, text=True)
        p = r.stdout.strip()
        if not (os.path.isabs(p) and os.path.exists(p)):
            return None
        libs.append(os.path.realpath(p))
    return " ".join(libs)


@pytest.mark.skipif(os.environ.get("AOQ_EMU_ASAN") == "1", reason="this is the ASan run")
def test_emulated_kernels_under_asan():
    """The emulated memcheck: the kernels built with AddressSanitizer, rerun in
    a process with libasan preloaded (torch's CPU tensors get redzones), must
    stay clean; and an out-of-bounds read is caught (the check has teeth)."""
    asan = _asan_preload()
    if asan is None:
        pytest.skip("the host compiler has no libasan")
    env = dict(os.environ, LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0", AOQ_EMU_ASAN="1",
               OMP_NUM_THREADS="1")
    sel = ("(equal_cpu and ((bfloat16 and (32 or 128)) or (float32 and (64 or 256)))) or fp8_row "
           "or unstaged or stage_limit or pack or unaligned or race_thread_order or launcher or emulator")
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p",
                        "no:cacheprovider", "-k", sel], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "AddressSanitizer" not in out, out[-4000:]
    assert " passed" in out and " failed" not in out
    code = ("import torch; from tests.cuda_emu.build import build; import ctypes;"
            "lib = build('tests/cuda_emu/selftest.cu');"
            "lib.emu_selftest.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint];"
            "x = torch.zeros({size}); lib.emu_selftest({which}, x.data_ptr(), None, 1, {block})")
    # kernel 6 reads past its global buffer, kernel 10 past the dynamic shared memory
    for which, size, block in ((6, 64, 64), (10, 129, 128)):
        r = subprocess.run([sys.executable, "-c", code.format(size=size, which=which, block=block)], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr, (which, r.stderr[-3000:])


def test_emulated_launcher_errors(lib):
    """Argument checks and device handling of the launchers."""
    w = make_weight(8, 256, torch.bfloat16, 128)
    out = torch.empty_like(w)
    args = (ptr(w), ptr(out), None, None, None)
    assert lib.aoq_cuda_fq_fwd(*args, 8, 250, 128, 2, 0, 0, 1, 0, None) == 1  # K % g
    assert lib.aoq_cuda_fq_fwd(*args, 0, 256, 128, 2, 0, 0, 1, 0, None) == 1  # no rows
    assert lib.aoq_cuda_pack_awq(None, None, 12, 4, 0, None) == 1  # R % 8
    # device index: 1 fails with one device, works with two and restores the current device
    assert lib.aoq_cuda_fq_fwd(*args, 8, 256, 128, 2, 0, 0, 1, 1, None) == 2
    assert lib.aoq_cuda_last_error().decode() == "invalid device ordinal"
    lib.aoq_emu_set_devices(2)
    try:
        check(lib, lib.aoq_cuda_fq_fwd(*args, 8, 256, 128, 2, 0, 0, 1, 1, None))
        assert lib.aoq_emu_get_device() == 0
        assert torch.equal(out, torch.ops.ao_awq.fq_weight(w, 128, 0, False, False, 1))
    finally:
        lib.aoq_emu_set_devices(1)


# ---------------------------------------------------------------------------
# the emulator itself (tests/cuda_emu/selftest.cu)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selftest():
    lib = build(os.path.join(ROOT, "tests", "cuda_emu", "selftest.cu"))
    lib.emu_selftest.argtypes = [I, P, P, ctypes.c_uint, ctypes.c_uint]
    lib.emu_selftest_error.restype = ctypes.c_char_p
    lib.aoq_emu_set_order.argtypes = [I]
    return lib


def test_emulator_shuffles_and_block_reduction(selftest):
    out = torch.full((3 * 4,), -1.0)
    assert selftest.emu_selftest(0, ptr(out), None, 3, 256) == 0
    for b in range(3):
        v = torch.arange(1, 257, dtype=torch.float32) + b * 1000
        assert out[b * 4 + 0] == v[:32].max()             # xor tree of warp 0, at its lane 0
        assert out[b * 4 + 1] == v[32:64].sum()           # down tree of warp 1, at its lane 0
        assert out[b * 4 + 2] == v[5]                     # broadcast of lane 5 (warp 0)
        assert out[b * 4 + 3] == v.sum()                  # block sum through __shared__


@pytest.mark.parametrize("which, message", [
    (1, "misaligned vector access"),
    (2, "warp shuffle not reached by all 32 lanes"),
    (3, "threads of a block at different __syncthreads"),
    (4, "__syncthreads after some threads of the block returned"),
])
def test_emulator_reports_faults(selftest, which, message):
    buf = torch.zeros(512)
    rc = selftest.emu_selftest(which, ptr(buf), ptr(buf), 1, 128)
    assert rc != 0 and message in selftest.emu_selftest_error(rc).decode()
    # the error is consumed: the next good launch succeeds
    assert selftest.emu_selftest(0, ptr(buf), None, 1, 64) == 0


def test_emulator_poisons_shared_memory(selftest):
    """Shared memory starts each block as NaN (0xff bytes): a block reading
    what only an earlier block wrote sees the poison."""
    out = torch.zeros(3 * 64)
    assert selftest.emu_selftest(7, ptr(out), None, 3, 64) == 0
    assert (out[:64] == 1).all() and out[64:].isnan().all()


def test_emulator_dynamic_shared_memory(selftest):
    """A launch's dynamic shared memory: with the static part, over 48 KiB
    only for a kernel given the allowance (cudaFuncSetAttribute); shared by
    the block, and poisoned where the block never wrote."""
    out = torch.zeros(129)
    for which in (8, 11):  # 64 KiB; 512 bytes under 48 KiB (static shared memory on top)
        rc = selftest.emu_selftest(which, ptr(out), None, 2, 128)
        assert rc != 0 and "over the kernel's limit" in selftest.emu_selftest_error(rc).decode()
    assert selftest.emu_selftest(9, ptr(out), None, 2, 128) == 0
    assert torch.equal(out[:128], torch.arange(1.0, 129.0).roll(-1)) and out[128].isnan()


def test_emulator_thread_order_exposes_a_race(selftest):
    """The thread-order check has teeth: a kernel that reads a neighbour's
    __shared__ write without a barrier gives different results by order."""
    outs = []
    try:
        for order in (0, 1):
            selftest.aoq_emu_set_order(order)
            out = torch.zeros(128)
            assert selftest.emu_selftest(5, ptr(out), None, 1, 128) == 0
            outs.append(out)
    finally:
        selftest.aoq_emu_set_order(0)
    assert not torch.equal(outs[0], outs[1])
    # descending: each read sees its neighbour's write, but thread 127 runs
    # first and reads sh[0] before thread 0 writes it: the poison (NaN)
    assert torch.equal(outs[1][:127], torch.arange(1.0, 128.0)) and outs[1][127].isnan()
    # ascending: every read comes before its write, but thread 127's (of sh[0])
    assert outs[0][:127].isnan().all() and outs[0][127] == 0
