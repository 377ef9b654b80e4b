"""CUDA kernels: bit-identical to the CPU kernels and to torchao run on the
same GPU.  Skipped (cleanly) where no GPU or no CUDA build is present.

Division semantics: torch on CUDA evaluates `tensor / python_scalar` as a
multiplication by the float reciprocal, on the CPU as a division.  torchao's
formulas contain such divisions (amax / 448, range / 15), so in torchao mode
the GPU kernel follows the GPU rule and is compared bit for bit with the CPU
kernel run under the same rule (div_mode=1) and with torchao on the GPU.  AWQ
modes use true division everywhere and match the default CPU kernel exactly.
"""
import os

import pytest
import torch

import ao_awq_export as aq
from ao_awq_export import _C
from tests.test_cuda_emu import (asym_bwd_edge_case, f16_cases, fp8_bwd_edge_case, fp8_rows_case,
                                 midpoint_weight, row_tail_case, rows_bwd_cases, rows_layout_cases, special_weight,
                                 staged_bytes)
from tests.test_fake_quant import (OPS, Float8FakeQuantizeConfig, Float8FakeQuantizer, PerRow, assert_bits_equal,
                                   bits, check_grads, make_weight, torchao_fq, zero_torchao_nans)

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _C.built_with_cuda()),
                                reason="needs a CUDA GPU and a CUDA build of ao_awq_export")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SCH = {"fp8_int4": 0, "int4_asym": 1}


def staged(nbytes, dev=0):
    """The shared memory an fp8 kernel should stage `nbytes` of row data in on
    this GPU (the launch policy of fq_cuda.cu's choose(), see staged_bytes)."""
    p = torch.cuda.get_device_properties(dev)
    return staged_bytes(nbytes, (p.shared_memory_per_block_optin, p.shared_memory_per_multiprocessor))


def cpu_fwd(w, g, scheme, mode):
    return torch.ops.ao_awq.fq_weight(w.cpu(), g, SCH[scheme], mode == "awq", False,
                                      1 if mode == "torchao" else 0)


def cpu_bwd(grad, w, g, scheme, mode):
    return torch.ops.ao_awq.fq_weight_backward(grad.cpu(), w.cpu(), g, SCH[scheme], mode == "awq",
                                               aq.ops.CLAMP_STRICT, 1 if mode == "torchao" else 0)


def gpu_grad(fn, w, gout):
    w = w.clone().requires_grad_()
    fn(w).backward(gout)
    return w.grad


@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("mode", ["torchao", "awq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_gpu_forward_and_grad_equal_cpu(scheme, mode, dtype, g):
    for i, (n, k) in enumerate([(1, 256), (9, 512), (64, 1024), (33, 2048)]):
        w = make_weight(n, k, dtype, g, seed=i).cuda()
        out = OPS[scheme](w, g, mode=mode)
        fp8 = scheme == "fp8_int4"
        assert _C.cuda_last_stage_bytes() == (staged(k * w.element_size()) if fp8 else 0)
        assert_bits_equal(out.cpu(), cpu_fwd(w, g, scheme, mode), f"gpu vs cpu {scheme} {mode}")
        gout = (torch.randn(n, k, generator=torch.Generator().manual_seed(i)) * 1e3).to(dtype).cuda()
        gw = gpu_grad(lambda t: OPS[scheme](t, g, mode=mode), w, gout)
        assert _C.cuda_last_stage_bytes() == (staged(2 * k * w.element_size()) if fp8 else 0)
        assert_bits_equal(gw.cpu(), cpu_bwd(gout, w, g, scheme, mode), f"grad gpu vs cpu {scheme} {mode}")
        codes, scales, zeros = aq.quantize_int4(w, g, scheme=scheme, mode=mode) if not (
            dtype == torch.float16 and scheme == "fp8_int4") else (None, None, None)
        if codes is not None:
            c2, s2, z2 = torch.ops.ao_awq.quantize(w.cpu(), g, SCH[scheme], mode == "awq",
                                                   1 if mode == "torchao" else 0)
            assert torch.equal(codes.cpu(), c2)
            assert torch.equal(scales.float().cpu(), s2) and torch.equal(zeros.float().cpu(), z2)


@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_torchao_on_gpu(scheme, dtype):
    for g in (32, 128):
        w = make_weight(64, 1024, dtype, g, seed=3).cuda()
        theirs = zero_torchao_nans(torchao_fq(w, g, scheme), scheme, dtype)
        assert_bits_equal(OPS[scheme](w, g).cpu(), theirs.cpu(), f"gpu vs torchao-gpu {scheme}")
        gout = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * 1e3).to(dtype).cuda()
        ours = gpu_grad(lambda t: OPS[scheme](t, g), w, gout)
        ref = gpu_grad(lambda t: torchao_fq(t, g, scheme), w, gout)
        fin = torch.isfinite(ref).all(-1)
        check_grads(ours[fin].cpu(), ref[fin].cpu(), w[fin].cpu(), g, scheme, f"grad gpu {scheme}")


@pytest.mark.parametrize("scheme", list(OPS))
def test_gpu_large_8192x28672(scheme):
    w = (torch.randn(8192, 28672, device="cuda") * 0.02).to(torch.bfloat16)
    out = OPS[scheme](w, 128)
    if scheme == "fp8_int4":  # a 57344-byte row: staged wherever sm_80/sm_90 allow 2 blocks per SM
        assert _C.cuda_last_stage_bytes() == staged(57344)
    assert_bits_equal(out, torchao_fq(w, 128, scheme), f"8192x28672 {scheme}")
    gout = torch.randn_like(w) * 1e3
    ours = gpu_grad(lambda t: OPS[scheme](t, 128), w, gout)
    theirs = gpu_grad(lambda t: torchao_fq(t, 128, scheme), w, gout)
    rows = slice(0, 256)  # CPU comparison of the full tensor is slow; rows are independent
    assert_bits_equal(ours[rows].cpu(), cpu_bwd(gout[rows], w[rows], 128, scheme, "torchao"), "grad cpu")
    check_grads(ours.cpu(), theirs.cpu(), w.cpu(), 128, scheme, "grad 8192x28672")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cs", [0, 1])
def test_gpu_fp8_rows_cases(dtype, cs):
    """test_cuda_emu's fp8_rows_case (zero, NaN, Inf rows, rows past the
    fast bound; k = 304 the vectorized forward, 300 the scalar one) and the
    e4m3 midpoints, forward and backward, against the CPU ops."""
    for k in (302, 304):
        x = fp8_rows_case(dtype, k, cs)
        out = torch.ops.ao_awq.fp8_rows(x.cuda(), False, cs)
        assert_bits_equal(out.cpu(), torch.ops.ao_awq.fp8_rows(x, False, cs), f"rows k={k}")
        g = (torch.randn(x.shape) * 100).to(dtype)
        for st in (False, True) if cs else ():
            gx = torch.ops.ao_awq.fp8_rows_backward(g.cuda(), x.cuda(), st, cs)
            assert_bits_equal(gx.cpu(), torch.ops.ao_awq.fp8_rows_backward(g, x, st, cs), f"rows grad k={k}")
    if dtype == torch.float32:
        w = midpoint_weight()
        out = torch.ops.ao_awq.fp8_rows(w.cuda(), False, cs)
        assert_bits_equal(out.cpu(), torch.ops.ao_awq.fp8_rows(w, False, cs), "rows midpoints")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_fp8_rows_backward_paths(dtype):
    """test_cuda_emu's rows_bwd_cases (plain rows, elements at and past each
    edge of the rows backward's fast domain, zero/NaN/Inf rows) on the GPU,
    against the CPU kernel under CUDA's division rule."""
    for name, x, G in rows_bwd_cases(dtype):
        for st in (False, True):
            gx = torch.ops.ao_awq.fp8_rows_backward(G.cuda(), x.cuda(), st, 1)
            assert_bits_equal(gx.cpu(), torch.ops.ao_awq.fp8_rows_backward(G, x, st, 1), f"{name} st={st}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", ["1", "0"])
def test_gpu_fp8_rows_backward_layouts(dtype, stage, monkeypatch):
    """test_cuda_emu's rows_layout_cases on the GPU, in aligned buffers (the
    vectorized kernel) and unaligned ones, staged and not, against the CPU
    kernel under CUDA's division rule."""
    monkeypatch.setenv("AOQ_CUDA_STAGE", stage)
    for k, x, G in rows_layout_cases(dtype):
        for st in (False, True):
            ref = torch.ops.ao_awq.fp8_rows_backward(G, x, st, 1)
            for off in (0, 1):
                xa, Ga = (torch.empty(3 * k + off, dtype=dtype, device="cuda")[off:].view(3, k) for _ in range(2))
                xa.copy_(x.cuda())
                Ga.copy_(G.cuda())
                gx = torch.ops.ao_awq.fp8_rows_backward(Ga, xa, st, 1)
                assert _C.cuda_last_stage_bytes() == (staged(2 * k * x.element_size()) if stage == "1" else 0)
                assert_bits_equal(gx.cpu(), ref, f"rows grad {dtype} k={k} st={st} off={off} stage={stage}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_fp8_rows_match_torchao_on_gpu(dtype):
    """fake_quant_fp8_rows against torchao's Float8FakeQuantizer (PerRow) run
    on the same GPU: the forward bit for bit (but torchao's all-zero row,
    0/0 = NaN, ours zeros), rows of 1024 (the vectorized kernels) and 1002
    (not a multiple of 16 bytes: element by element); the gradient through torchao's autograd on the GPU bit
    for bit but at each row's extremes (whose share of the row max's
    gradient is a sum, in torch's GPU order there)."""
    fq = Float8FakeQuantizer(Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow()))
    for k in (1024, 1002):
        gen = torch.Generator().manual_seed(k)
        x = (torch.randn(64, k, generator=gen) * 4).to(dtype).cuda()
        x[0] = 0.0
        g = ((torch.randn(64, k, generator=gen) * 100).to(dtype)).cuda()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, theirs = aq.fake_quant_fp8_rows(x1), fq(x2)
        assert theirs[0].isnan().all() and bool((ours[0] == 0).all())
        keep = ~theirs.isnan()
        assert torch.equal(bits(ours)[keep], bits(theirs)[keep]), f"forward {dtype} k={k}"
        ours.backward(g)
        theirs.backward(g)
        fin = torch.isfinite(x2.grad).all(-1)
        assert int(fin.sum()) >= 32
        ext = x.abs() == x.abs().amax(-1, keepdim=True)
        m = fin.unsqueeze(-1) & ~ext
        assert torch.equal(bits(x1.grad)[m], bits(x2.grad)[m]), f"grad {dtype} k={k}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_fp8_rows(dtype):
    x = (torch.randn(5, 7, 304) * 3).to(dtype).cuda()
    x[0, 0] = 0
    out = aq.fake_quant_fp8_rows(x)
    cpu = torch.ops.ao_awq.fp8_rows(x.cpu(), False, 1)
    assert_bits_equal(out.cpu(), cpu, "rows gpu vs cpu")
    g = (torch.randn_like(x) * 100)
    xr = x.clone().requires_grad_()
    aq.fake_quant_fp8_rows(xr).backward(g)
    assert_bits_equal(xr.grad.cpu(), torch.ops.ao_awq.fp8_rows_backward(g.cpu(), x.cpu(), aq.ops.CLAMP_STRICT, 1), "rows grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_fp8_row_tail(dtype):
    """The fp8 row backwards' last step on the rows of test_cuda_emu.py's
    test_emulated_fp8_row_tail (many extremes, -0 gradients, NaN)."""
    g, w, gout = row_tail_case(dtype)
    st = aq.ops.CLAMP_STRICT
    ours = torch.ops.ao_awq.fq_weight_backward(gout.cuda(), w.cuda(), g, 0, False, st, 1)
    assert_bits_equal(ours.cpu(), torch.ops.ao_awq.fq_weight_backward(gout, w, g, 0, False, st, 1),
                      "fp8_int4 row tail")
    ours = torch.ops.ao_awq.fp8_rows_backward(gout.cuda(), w.cuda(), st, 1)
    assert_bits_equal(ours.cpu(), torch.ops.ao_awq.fp8_rows_backward(gout, w, st, 1), "rows row tail")


def gpu_f16_run(kind, *a):
    """test_cuda_emu.f16_cases's runs on the GPU, against the CPU ops."""
    ops = torch.ops.ao_awq
    if kind == "fwd":
        x, g, scheme, awq, cs = a
        got = [ops.fq_weight(x.cuda(), g, SCH[scheme], bool(awq), False, cs)]
        got += ops.quantize(x.cuda(), g, SCH[scheme], bool(awq), cs)
        ref = [ops.fq_weight(x, g, SCH[scheme], bool(awq), False, cs)] + list(ops.quantize(x, g, SCH[scheme],
                                                                                            bool(awq), cs))
        got[1], ref[1] = got[1].float(), ref[1].float()
        return [(o.cpu(), r, what) for o, r, what in zip(got, ref, ("out", "codes", "scales", "zeros"))]
    if kind == "bwd":
        G, x, g, scheme, awq, cs, st = a
        return (ops.fq_weight_backward(G.cuda(), x.cuda(), g, SCH[scheme], bool(awq), bool(st), cs).cpu(),
                ops.fq_weight_backward(G, x, g, SCH[scheme], bool(awq), bool(st), cs))
    x, G = a
    return [(ops.fp8_rows(x.cuda(), False, 1).cpu(), ops.fp8_rows(x, False, 1), "rows"),
            (ops.fp8_rows_backward(G.cuda(), x.cuda(), True, 1).cpu(), ops.fp8_rows_backward(G, x, True, 1),
             "rows grad")]


def test_gpu_every_f16_value():
    """Every fp16 bit pattern through every fp16 kernel (test_cuda_emu's
    every_f16_case): on a GPU each conversion to and from fp16 is the
    hardware's (aoq_math.h), which the emulator does not run."""
    assert f16_cases(gpu_f16_run) == 72


@pytest.mark.parametrize("mode", ["torchao", "awq"])
def test_gpu_unstaged(mode, monkeypatch):
    """AOQ_CUDA_STAGE=0: the fp8 kernels that read the row again from global
    memory instead of staging it in shared memory (the fallback for rows
    that do not fit); the staged ones run in the tests above."""
    monkeypatch.setenv("AOQ_CUDA_STAGE", "0")
    for dtype, g in ((torch.bfloat16, 128), (torch.float32, 32)):
        test_gpu_forward_and_grad_equal_cpu("fp8_int4", mode, dtype, g)
    if mode == "torchao":
        test_gpu_fp8_rows(torch.bfloat16)
        test_gpu_fp8_row_tail(torch.float16)


@pytest.mark.parametrize("scheme", list(OPS))
def test_gpu_forward_general_code(scheme, monkeypatch):
    """AOQ_CUDA_FAST=0: the general code of the forward and the backward for
    every row and group (the fast paths run in the tests above)."""
    monkeypatch.setenv("AOQ_CUDA_FAST", "0")
    for mode in ("torchao", "awq"):
        for dtype, g in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 32)):
            test_gpu_forward_and_grad_equal_cpu(scheme, mode, dtype, g)


@pytest.mark.parametrize("scheme", list(SCH))
@pytest.mark.parametrize("mode", ["torchao", "awq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forward_special_rows(scheme, mode, dtype):
    """Rows and groups that the forward's fast paths leave to the general code
    (NaN, Inf, past the fast bound, fp16 scale overflow: special_weight),
    beside groups that take them, against the CPU kernels."""
    w = special_weight(dtype, 64)
    awq, cs = mode == "awq", 1 if mode == "torchao" else 0
    out = torch.ops.ao_awq.fq_weight(w.cuda(), 64, SCH[scheme], awq, False, cs)
    assert_bits_equal(out.cpu(), torch.ops.ao_awq.fq_weight(w, 64, SCH[scheme], awq, False, cs), "special rows")
    got = torch.ops.ao_awq.quantize(w.cuda(), 64, SCH[scheme], awq, cs)
    for a, b, what in zip(got, torch.ops.ao_awq.quantize(w, 64, SCH[scheme], awq, cs), ("codes", "scales", "zeros")):
        assert_bits_equal(a.cpu(), b, what)


@pytest.mark.parametrize("scheme", list(SCH))
@pytest.mark.parametrize("mode", ["torchao", "awq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_backward_domain_edges(scheme, mode, dtype):
    """Weights, gradients, groups and rows at and just past each edge of the
    backward's fast domains (aoq_div_by for the divisions, the fast
    roundings), zeros of both signs among them, against the CPU kernel."""
    awq, cs = mode == "awq", 1 if mode == "torchao" else 0
    w, G, _ = (fp8_bwd_edge_case(dtype, 64, int(awq)) if scheme == "fp8_int4"
               else asym_bwd_edge_case(dtype, 64))
    for st in (False, True):
        ref = torch.ops.ao_awq.fq_weight_backward(G, w, 64, SCH[scheme], awq, st, cs)
        got = torch.ops.ao_awq.fq_weight_backward(G.cuda(), w.cuda(), 64, SCH[scheme], awq, st, cs)
        assert_bits_equal(got.cpu(), ref, f"{scheme} {mode} {dtype} st={st}")


@pytest.mark.parametrize("mode", ["torchao", "awq"])
def test_gpu_fp8_values_near_e4m3_midpoints(mode):
    """fp32 weights on every e4m3 midpoint times the row scale (the fp8 fast
    path's reciprocal must not round them otherwise than the division)."""
    w = midpoint_weight()
    awq, cs = mode == "awq", 1 if mode == "torchao" else 0
    out = torch.ops.ao_awq.fq_weight(w.cuda(), 32, 0, awq, False, cs)
    assert_bits_equal(out.cpu(), torch.ops.ao_awq.fq_weight(w, 32, 0, awq, False, cs), "midpoints")


NEAR_48K = """
import torch, ao_awq_export as aq
from ao_awq_export import _C
from tests.test_cuda import staged
from tests.test_fake_quant import assert_bits_equal, make_weight
st = aq.ops.CLAMP_STRICT
for k in (24192, 24576):   # forward: 48384 and 49152 bytes of bf16 row
    w = make_weight(4, k, torch.bfloat16, 128, seed=1)
    out = torch.ops.ao_awq.fq_weight(w.cuda(), 128, 0, False, False, 1)
    assert _C.cuda_last_stage_bytes() == staged(2 * k), _C.cuda_last_stage_bytes()
    assert_bits_equal(out.cpu(), torch.ops.ao_awq.fq_weight(w, 128, 0, False, False, 1), f"fwd {k}")
    out = torch.ops.ao_awq.fp8_rows(w.cuda(), False, 1)
    assert _C.cuda_last_stage_bytes() == staged(2 * k)
    assert_bits_equal(out.cpu(), torch.ops.ao_awq.fp8_rows(w, False, 1), f"rows {k}")
for k in (12096, 12288):   # backward: 2 x 12288 bf16 = 48 KiB, the hidden size of many models
    w = make_weight(4, k, torch.bfloat16, 64, seed=2)
    gout = (torch.randn(4, k) * 1e3).to(torch.bfloat16)
    gw = torch.ops.ao_awq.fq_weight_backward(gout.cuda(), w.cuda(), 64, 0, False, st, 1)
    assert _C.cuda_last_stage_bytes() == staged(4 * k)
    assert_bits_equal(gw.cpu(), torch.ops.ao_awq.fq_weight_backward(gout, w, 64, 0, False, st, 1), f"bwd {k}")
    gx = torch.ops.ao_awq.fp8_rows_backward(gout.cuda(), w.cuda(), st, 1)
    assert _C.cuda_last_stage_bytes() == staged(4 * k)
    assert_bits_equal(gx.cpu(), torch.ops.ao_awq.fp8_rows_backward(gout, w, st, 1), f"rows bwd {k}")
print("ok")
"""


def test_gpu_staged_rows_just_under_48k():
    """Rows whose staged bytes are at or just under 48 KiB, each the first
    launch of its kernel in a fresh process: the 48 KiB default counts the
    kernels' static shared memory too, so these launches need the allowance
    the launchers set (without it: 'invalid argument')."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", NEAR_48K], cwd=root, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_gpu_pack():
    c = torch.randint(0, 16, (4096, 512), dtype=torch.uint8)
    assert torch.equal(aq.pack_awq(c.cuda()).cpu(), aq.pack_awq(c))


def test_non_default_stream_and_graph_capture():
    w = make_weight(256, 1024, torch.bfloat16, 128, seed=9).cuda()
    ref = aq.fake_quant_int4_asym(w, 128, mode="awq")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = aq.fake_quant_int4_asym(w, 128, mode="awq")
    s.synchronize()
    assert torch.equal(out, ref)
    # CUDA graph capture and replay; the long rows' staged kernels (over 48 KiB
    # of shared memory) get their allowance (cudaFuncSetAttribute) while
    # captured when this is their first launch (as in the sanitizer runs' -k)
    static_w = w.clone()
    static_long = make_weight(16, 28672, torch.bfloat16, 128, seed=11).cuda()
    gout = torch.randn_like(static_long)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = aq.fake_quant_fp8_int4(static_w, 128)
        static_long_out = aq.fake_quant_fp8_int4(static_long, 128)
        static_gw = torch.ops.ao_awq.fq_weight_backward(gout, static_long, 128, 0, False, aq.ops.CLAMP_STRICT, 1)
    assert _C.cuda_last_stage_bytes() == staged(2 * 28672 * 2)  # 112 KiB: staged on an H100/H200
    static_w.copy_(make_weight(256, 1024, torch.bfloat16, 128, seed=10).cuda())
    static_long.copy_(make_weight(16, 28672, torch.bfloat16, 128, seed=12).cuda())
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, aq.fake_quant_fp8_int4(static_w, 128))
    assert torch.equal(static_long_out, aq.fake_quant_fp8_int4(static_long, 128))
    assert_bits_equal(static_gw.cpu(), cpu_bwd(gout, static_long, 128, "fp8_int4", "torchao"), "captured bwd")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_device_index_1():
    w = make_weight(64, 512, torch.bfloat16, 64, seed=1)
    assert torch.equal(aq.fake_quant_fp8_int4(w.to("cuda:1"), 64).cpu(), aq.fake_quant_fp8_int4(w.cuda(), 64).cpu())


def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    w = torch.randn(128, 256, device="cuda", requires_grad=True)
    x = torch.randn(8, 256, device="cuda")

    def f(w, x):
        return torch.nn.functional.linear(aq.fake_quant_fp8_rows(x), aq.fake_quant_fp8_int4(w, 64))

    out = torch.compile(f, fullgraph=True)(w, x)
    assert torch.allclose(out, f(w, x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_unaligned_pointer_scalar_path():
    """A contiguous view whose data pointer is not 16-byte aligned takes the
    scalar-load path; results must not change."""
    base = torch.empty(64 * 512 + 1, dtype=torch.bfloat16, device="cuda")
    w = base[1:].view(64, 512)
    w.copy_(make_weight(64, 512, torch.bfloat16, 128, seed=2).cuda())
    assert w.data_ptr() % 16 != 0
    for scheme in OPS:
        assert torch.equal(OPS[scheme](w, 128), OPS[scheme](w.clone(), 128))
