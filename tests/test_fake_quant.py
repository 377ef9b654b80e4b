"""Fake-quant ops: bit-exact against torchao itself and against the
independent reference in tests/reference.py, forward and backward.

Gradient exactness (stated contract):
  * every element that is not an extreme of its group/row (not the group
    max/min for int4-asym; not |wd| == group amax nor |w| == row amax for
    fp8-int4) gets a gradient bit-identical to torch autograd;
  * extreme elements also receive sums over the group (or row) of per-element
    terms.  In torchao mode the CPU kernel adds them in torch's own CPU order
    (probed at import: ops.TORCH_SUM_VW), and then every element is compared
    bit for bit.  In awq mode (against tests/reference.py) and where the
    order is not recognised, ours is one fixed order shared by the CPU and
    CUDA kernels; both are correctly rounded sums of the same terms, so they
    agree to the rounding of those sums: |ours - torch| <= K * eps(D) *
    max|grad| of the row.
"""
import warnings

import pytest
import torch

import ao_awq_export as aq
from tests import reference as ref

warnings.filterwarnings("ignore")

torchao = pytest.importorskip("torchao", reason="torchao is a test requirement (see .ci/run)")
from torchao.quantization.qat.fake_quantize_config import (  # noqa: E402
    Float8FakeQuantizeConfig,
    Int4WeightFakeQuantizeConfig,
)
from torchao.quantization.qat.fake_quantizer import (  # noqa: E402
    Float8FakeQuantizer,
    Int4WeightFakeQuantizer,
)
from torchao.quantization.granularity import PerRow  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OPS = {"fp8_int4": aq.fake_quant_fp8_int4, "int4_asym": aq.fake_quant_int4_asym}
ACT = {"fp8_int4": torch.float8_e4m3fn, "int4_asym": torch.bfloat16}


def torchao_fq(w, g, scheme):
    cfg = Int4WeightFakeQuantizeConfig(group_size=g, activation_dtype=ACT[scheme])
    return Int4WeightFakeQuantizer(cfg)(w)


def ref_fq(w, g, scheme, awq=False, cuda=False):
    fn = ref.fp8_int4 if scheme == "fp8_int4" else ref.int4_asym
    return fn(w, g, awq=awq, cuda=cuda)


def bits(t):
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t.view(torch.int16)


def assert_bits_equal(ours, theirs, what):
    """Bit-for-bit equality (signed zeros included), NaN where NaN."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    nan = theirs.isnan()
    assert torch.equal(ours.isnan(), nan), f"{what}: NaN positions differ"
    diff = (bits(ours) != bits(theirs)) & ~nan
    assert int(diff.sum()) == 0, (
        f"{what}: {int(diff.sum())} elements differ; first at {diff.nonzero()[0].tolist()}: "
        f"ours {ours[diff][0].item()!r} vs {theirs[diff][0].item()!r}")


def make_weight(n, k, dtype, g, seed=0, special=True):
    """Random weights plus the edge cases of SPEC 1/2."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    if special and n >= 8:
        w[1] = 0.0                                   # all-zero row (fp8 row eps path)
        w[2, :g] = 0.0                               # all-zero group (int4 eps path)
        w[3] *= 1e-7                                 # tiny magnitudes
        w[4] *= 3e3                                  # huge (fits fp16)
        w[5, :g] = 0.25                              # constant group: max == min
        w[6, 0:g:8] = w[6, :g].abs().max() * 1.5     # ties at the group max
        w[7, 0] = 1.0                                # +max of its group: +8 -> clipped to 7
        w[7, 1] = -1.0                               # -max -> -8 exactly
    return w.to(dtype)


def zero_torchao_nans(theirs, scheme, dtype):
    """torchao's formula yields NaN only for fp16 fp8-int4 (0/0 when the row
    scale underflows, 0*inf when a group scale's fp16 reciprocal overflows);
    we define those outputs as 0."""
    nan = theirs.isnan()
    if nan.any():
        assert scheme == "fp8_int4" and dtype == torch.float16
    return torch.where(nan, torch.zeros_like(theirs), theirs)


def extreme_mask(w, g, scheme):
    n, k = w.shape
    if scheme == "int4_asym":
        x = w.float().view(n, -1, g)
        m = (x == x.amax(-1, keepdim=True)) | (x == x.amin(-1, keepdim=True))
        return m.view(n, k)
    with torch.no_grad():
        wd = ref.fp8_rows(w).view(n, -1, g).abs()
        m = (wd == wd.amax(-1, keepdim=True)).view(n, k)
        return m | (w.abs() == w.abs().amax(-1, keepdim=True))


def torch_order(dtype):
    """True when our CPU kernel sums in torch's own order for this dtype
    (torchao mode): then the extremes must match torch bit for bit too."""
    return aq.ops.TORCH_SUM_VW > 0 and (dtype == torch.float32 or aq.ops.TORCH_SUM_HALF)


def check_grads(ours, theirs, w, g, scheme, what, exact=False):
    """Bit for bit (signed zeros included) off the extremes; on the extremes
    within the error bound of a K-term sum: K * eps(D) * max|grad| of the row,
    or bit for bit as well when `exact` (torch's summation order)."""
    if theirs.numel() == 0:
        return
    ext = extreme_mask(w, g, scheme)
    fin = torch.isfinite(theirs)
    if exact:
        nbad = int((bits(ours)[fin] != bits(theirs)[fin]).sum())
        assert nbad == 0, f"{what}: {nbad} gradients differ bit-wise (torch's sum order)"
    off = ~ext & fin
    nbad = int((bits(ours)[off] != bits(theirs)[off]).sum())
    assert nbad == 0, f"{what}: {nbad} non-extreme gradients differ bit-wise"
    eps = torch.finfo(w.dtype).eps
    rowmax = torch.maximum(ours.float().abs(), theirs.float().abs()).amax(-1, keepdim=True)
    d = (ours.float() - theirs.float()).abs()
    bad = ext & fin & (d > w.shape[1] * eps * rowmax)
    assert int(bad.sum()) == 0, f"{what}: {int(bad.sum())} extreme gradients beyond the bound"


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------
SHAPES = [(1, 128), (7, 256), (8, 512), (33, 384), (64, 1024)]


@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_forward_matches_torchao(scheme, dtype, g):
    for i, (n, k) in enumerate(SHAPES):
        k = max(k - k % g, g)
        w = make_weight(n, k, dtype, g, seed=i)
        ours = OPS[scheme](w, g)
        theirs = torchao_fq(w, g, scheme)
        indep = ref_fq(w, g, scheme)
        assert_bits_equal(indep, theirs, f"reference vs torchao {scheme} {dtype} {n}x{k} g{g}")
        nan = theirs.isnan()
        if nan.any():
            # only fp16 fp8-int4, where torchao computes 0/0 (row scale underflow) or
            # 0 * inf (group scale < 1/65504 has an infinite fp16 reciprocal): we give 0
            assert scheme == "fp8_int4" and dtype == torch.float16
            assert torch.all(ours[nan] == 0)
            theirs = torch.where(nan, torch.zeros_like(theirs), theirs)
        assert_bits_equal(ours, theirs, f"ours vs torchao {scheme} {dtype} {n}x{k} g{g}")


@pytest.mark.parametrize("scheme", list(OPS))
def test_forward_4096(scheme):
    w = make_weight(4096, 4096, torch.bfloat16, 128, seed=7)
    assert_bits_equal(OPS[scheme](w, 128), torchao_fq(w, 128, scheme), f"4096x4096 {scheme}")


def test_edge_values_explicit():
    # +max of a group -> code +8 clipped to 7; -max -> -8 exactly
    w = torch.zeros(1, 32, dtype=torch.float32)
    w[0, 0], w[0, 1], w[0, 2] = 1.0, -1.0, 0.5
    out = aq.fake_quant_fp8_int4(w, 32)
    codes, scales, zeros = aq.quantize_int4(w, 32, scheme="fp8_int4")
    assert codes[0, 0].item() == 15 and codes[0, 1].item() == 0 and codes[0, 2].item() == 12
    assert scales[0, 0].item() == 0.125 and out[0, 0].item() == 0.875 and out[0, 1].item() == -1.0
    # all-zero group: eps scales, zero output, code 8 / zero 8 (no NaN)
    z = torch.zeros(2, 64)
    assert torch.equal(aq.fake_quant_fp8_int4(z, 32), z)
    assert torch.equal(aq.fake_quant_int4_asym(z, 32), z)
    c, s, zz = aq.quantize_int4(z, 32, scheme="int4_asym", mode="awq")
    assert torch.all(c == 0) and torch.all(zz == 0)
    assert torch.equal(s, torch.full_like(s, 1e-6 / 15).to(torch.float16))


@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_awq_mode_matches_reference(scheme, dtype):
    for g in (32, 128):
        w = make_weight(16, 512, dtype, g, seed=3)
        theirs = ref_fq(w, g, scheme, awq=True)
        theirs = zero_torchao_nans(theirs, scheme, dtype)
        assert_bits_equal(OPS[scheme](w, g, mode="awq"), theirs, f"awq {scheme} {dtype} g{g}")


@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_division_semantics_emulated(scheme, dtype):
    """The kernel path that reproduces torchao-on-CUDA (tensor / scalar done as
    a reciprocal multiply), run on the CPU against the emulating reference."""
    w = make_weight(16, 256, dtype, 64, seed=5)
    ours = torch.ops.ao_awq.fq_weight(w, 64, aq.SCHEMES[scheme], False, False, 1)
    theirs = zero_torchao_nans(ref_fq(w, 64, scheme, cuda=True), scheme, dtype)
    assert_bits_equal(ours, theirs, f"cuda-semantics {scheme} {dtype}")


def test_noncontiguous_input():
    w = make_weight(64, 256, torch.bfloat16, 64, seed=1)
    wt = w.t().contiguous().t()  # same values, transposed strides
    assert not wt.is_contiguous()
    for scheme, fn in OPS.items():
        assert_bits_equal(fn(wt, 64), fn(w, 64), f"non-contiguous {scheme}")
    assert_bits_equal(aq.fake_quant_fp8_rows(wt), aq.fake_quant_fp8_rows(w), "rows non-contiguous")


def test_nonfinite_propagates_per_group():
    w = make_weight(4, 128, torch.float32, 32, seed=2, special=False)
    w[0, 5] = float("nan")
    w[2, 40] = float("inf")
    out = aq.fake_quant_int4_asym(w, 32)
    assert out[0, :32].isnan().all() and out[2, 32:64].isnan().all()
    assert torch.isfinite(out[0, 32:]).all() and torch.isfinite(out[1]).all()
    assert_bits_equal(out, torchao_fq(w, 32, "int4_asym"), "nan policy int4_asym")
    out = aq.fake_quant_fp8_int4(w, 32)
    assert out[0].isnan().all() and out[2].isnan().all() and torch.isfinite(out[1]).all()


def test_fp16_scale_overflow_policy():
    """mode "awq": a group whose fp16 scale overflows computes non-finite values
    in that group only (like torchao's own fp16 scales would), and every step
    that stores scales (quantize_int4, convert, export) raises, saying where."""
    w = make_weight(16, 128, torch.float32, 32, seed=3, special=False)
    w[3, 70] = 1.2e6   # int4_asym: range/15 > 65504; fp8_int4: max|w|/8 > 65504
    for scheme, fn in OPS.items():
        out = fn(w, 32, mode="awq")
        assert not torch.isfinite(out[3, 64:96]).any(), scheme
        keep = torch.ones_like(out, dtype=torch.bool)
        keep[3] = False
        assert torch.isfinite(out[keep]).all() and torch.isfinite(out[3, :64]).all()
        with pytest.raises(ValueError, match=r"w: the float16 scale of row 3, group 2 "
                                             r"\(columns 64\.\.95\) overflows"):
            aq.quantize_int4(w, 32, scheme=scheme, mode="awq")
    w[3, 70] = float("nan")
    with pytest.raises(ValueError, match=r"w: contains NaN or Inf \(first at \[3, 70\]\)"):
        aq.quantize_int4(w, 32, scheme="int4_asym", mode="awq")
    # an overflow that is not the fp16 scale's (a weight at the dtype's largest
    # value; mode torchao stores no fp16 scale): worded as what it is
    w16 = make_weight(16, 128, torch.float16, 32, seed=3, special=False)
    w16[3, 70] = 65504.0
    for mode in ("torchao", "awq"):
        with pytest.raises(ValueError, match=r"w: the quantization of row 3, group 2 \(columns "
                                             r"64\.\.95\) overflows torch\.float16"):
            aq.quantize_int4(w16, 32, scheme="fp8_int4", mode=mode)
    wb = make_weight(16, 128, torch.bfloat16, 32, seed=3, special=False)
    wb[3, 70] = torch.finfo(torch.bfloat16).max
    with pytest.raises(ValueError, match=r"overflows torch\.bfloat16 \(\|w\| too close"):
        aq.quantize_int4(wb, 32, scheme="fp8_int4", mode="torchao")


def test_bad_choices_and_empty_codes():
    w = make_weight(8, 64, torch.float32, 32, seed=4, special=False)
    for bad in ([], {"a": 1}, None, 1):
        with pytest.raises(ValueError, match="scheme must be one of"):
            aq.quantize_int4(w, 32, scheme=bad)
        with pytest.raises(ValueError, match="mode must be one of"):
            aq.fake_quant_int4_asym(w, 32, mode=bad)
    for shape in ((0, 128), (16, 0)):
        with pytest.raises(ValueError, match="codes must not be empty"):
            aq.pack_awq(torch.empty(shape, dtype=torch.uint8))
    c, s, z = aq.quantize_int4(w, 32, scheme="int4_asym", mode="awq")
    with pytest.raises(ValueError, match="codes must not be empty"):
        aq.dequantize_int4(c[:, :0], s, z, scheme="int4_asym", mode="awq")
    for bad_z in (z.bool(), z.float(), z.to(torch.complex64)):
        with pytest.raises(TypeError, match="zeros must be uint8"):
            aq.dequantize_int4(c, s, bad_z, scheme="int4_asym", mode="awq")
    c, s, z = aq.quantize_int4(w, 32, scheme="int4_asym", mode="torchao")
    with pytest.raises(TypeError, match="zeros must be floating point"):
        aq.dequantize_int4(c, s, z.to(torch.uint8), scheme="int4_asym", mode="torchao")


# ---------------------------------------------------------------------------
# fp8 activation rows
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_rows_matches_torchao(dtype):
    x = (torch.randn(3, 5, 96) * 4).to(dtype)
    x[0, 1] = 0.0
    theirs = Float8FakeQuantizer(Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow()))(x)
    ours = aq.fake_quant_fp8_rows(x)
    assert theirs[0, 1].isnan().all()          # torchao: no eps, 0/0
    assert torch.equal(ours[0, 1], torch.zeros_like(ours[0, 1]))
    keep = ~theirs.isnan()
    assert torch.equal(bits(ours)[keep], bits(theirs)[keep])
    assert_bits_equal(ours, zero_torchao_nans(ref.fp8_rows(x), "fp8_int4", dtype),
                      f"fp8 rows vs reference {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_rows_tiny_rows(dtype):
    """Rows of amax below 1e-12: SPEC 1 clamps the row amax at 1e-12 (torchao's
    activation quantizer has no bound: it differs there, and equals the
    quantizer with hp_value_lb=1e-12). fp16 rows whose scale underflows to 0:
    torchao's clamp(x / 0) * 0 is x's signed zero (NaN for x = ±0), so is ours
    (+0 for x = ±0)."""
    x = torch.tensor([[3e-13, -1.7e-13, 1e-13, 2.5e-14, 0.0, -0.0, -1e-13, 5e-14],
                      [1e-6, -1e-6, 2e-6, -3e-7, 0.0, -0.0, -2e-6, 1e-7],
                      [1e-5, -2e-5, 0.0, -0.0, 3e-6, -1e-5, 2e-5, -1e-7]]).to(dtype)
    x = x.repeat(1, 8)  # 64: the vectorized kernels too
    cfg = Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow())
    lb = Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow(), hp_value_lb=1e-12)
    ours = aq.fake_quant_fp8_rows(x)
    theirs, theirs_lb = Float8FakeQuantizer(cfg)(x), Float8FakeQuantizer(lb)(x)
    keep = ~theirs_lb.isnan()
    assert torch.equal(bits(ours)[keep], bits(theirs_lb)[keep])
    assert torch.equal(ours[~keep], torch.zeros_like(ours[~keep]))
    assert_bits_equal(ours, zero_torchao_nans(ref.fp8_rows(x), "fp8_int4", dtype),
                      f"tiny rows vs reference {dtype}")
    if dtype == torch.float16:  # the first two rows' scales underflow: x's signed zeros
        want = torch.where(x[:2] == 0, 0.0, x[:2] * 0.0).to(dtype)
        assert torch.equal(bits(ours[:2]), bits(want)) and (want.signbit() & (x[:2] != 0)).any()
        assert ours[2].abs().amax() > 0
        keep = ~theirs.isnan()
        assert torch.equal(bits(ours)[keep], bits(theirs)[keep])
    else:
        assert not torch.equal(ours[0], theirs[0])  # torchao: no 1e-12 bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_rows_grad(dtype):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(16, 200, generator=gen) * 2).to(dtype)
    g = (torch.randn(16, 200, generator=gen) * 100).to(dtype)  # the fp8 gradient cast keeps some
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    aq.fake_quant_fp8_rows(x1).backward(g)
    ref.fp8_rows(x2).backward(g)
    # fp16 only: where the row-scale gradient overflows fp16, torch's amax
    # backward computes inf * 0 = NaN over the whole row; we compare the rest
    fin = torch.isfinite(x2.grad).all(-1)
    assert fin.sum() >= 8
    gx1, gx2, xx = x1.grad[fin], x2.grad[fin], x[fin]
    assert (gx2 != 0).any()
    ext = xx.abs() == xx.abs().amax(-1, keepdim=True)
    assert torch.equal(gx1[~ext], gx2[~ext])
    if torch_order(torch.float32):  # the row sums are fp32 in torchao for every dtype
        assert torch.equal(bits(gx1), bits(gx2))
    eps = torch.finfo(dtype).eps
    tol = 64 * eps * torch.maximum(gx1.abs(), gx2.abs()).float().amax(-1, keepdim=True)
    assert ((gx1.float() - gx2.float()).abs() <= tol)[ext].all()


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------
def _grads(fn, w, gout):
    w = w.clone().requires_grad_()
    fn(w).backward(gout)
    return w.grad


@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_grad_matches_torchao(scheme, dtype, g):
    for i, (n, k) in enumerate([(1, 256), (9, 512), (64, 1024)]):
        w = make_weight(n, k, dtype, g, seed=10 + i)
        # a few exact zeros and a -0 upstream gradient: signed zeros are compared too
        # scale 1e3: the fp8 path casts the gradient to float8 (as torchao does),
        # so small upstream gradients would all vanish and test nothing
        gout = (torch.randn(n, k, generator=torch.Generator().manual_seed(i)) * 1e3).to(dtype)
        gout[0, :7] = -0.0
        ours = _grads(lambda t: OPS[scheme](t, g), w, gout)
        theirs = _grads(lambda t: torchao_fq(t, g, scheme), w, gout)
        indep = _grads(lambda t: ref_fq(t, g, scheme), w, gout)
        assert torch.equal(indep.nan_to_num(), theirs.nan_to_num())
        if scheme == "fp8_int4" and dtype == torch.float16:
            nanrows = theirs.isnan().any(-1)
            ours, theirs, w2 = ours[~nanrows], theirs[~nanrows], w[~nanrows]
        else:
            w2 = w
        assert theirs.numel() == 0 or (theirs != 0).float().mean() > 0.05
        check_grads(ours, theirs, w2, g, scheme, f"grad {scheme} {dtype} {n}x{k} g{g}",
                    exact=torch_order(dtype))


@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_awq_mode_matches_reference(scheme, dtype):
    g = 64
    w = make_weight(16, 512, dtype, g, seed=21)
    gout = (torch.randn(16, 512, generator=torch.Generator().manual_seed(2)) * 1e3).to(dtype)
    ours = _grads(lambda t: OPS[scheme](t, g, mode="awq"), w, gout)
    theirs = _grads(lambda t: ref_fq(t, g, scheme, awq=True), w, gout)
    check_grads(ours, theirs, w, g, scheme, f"awq grad {scheme} {dtype}")


def test_grad_4096():
    w = make_weight(4096, 4096, torch.bfloat16, 128, seed=4)
    gout = (torch.randn(4096, 4096) * 1e3).to(torch.bfloat16)
    for scheme in OPS:
        ours = _grads(lambda t: OPS[scheme](t, 128), w, gout)
        theirs = _grads(lambda t: torchao_fq(t, 128, scheme), w, gout)
        check_grads(ours, theirs, w, 128, scheme, f"grad 4096 {scheme}",
                    exact=torch_order(torch.bfloat16))


def test_torch_sum_order_probe_and_emulation():
    """The C emulation of torch's CPU sum (used for torchao-mode gradients)
    equals torch.sum bit for bit, for group and row sizes, all three dtypes."""
    import platform

    from ao_awq_export import _C

    if platform.machine() in ("x86_64", "AMD64"):
        assert aq.ops.TORCH_SUM_VW in (8, 16) and aq.ops.TORCH_SUM_HALF
    vw = aq.ops.TORCH_SUM_VW
    if vw == 0:
        pytest.skip("this torch's CPU sum order was not recognised (canonical order kept)")
    gen = torch.Generator().manual_seed(5)
    for n in (1, 3, 5, 7, 13, 32, 64, 128, 256, 384, 1000, 4096, 28672, 70000):
        x = torch.randn(6, n, generator=gen) * torch.exp(3 * torch.randn(6, n, generator=gen))
        for dt in DTYPES:
            if dt != torch.float32 and not aq.ops.TORCH_SUM_HALF:
                continue
            t = (x.clamp(-6e4, 6e4) if dt == torch.float16 else x).to(dt)  # finite inputs
            want = t.sum(-1)
            for r in range(t.shape[0]):
                got = _C.torch_sum(aq.ops._as_buffer(t[r].float().contiguous()), vw,
                                   dt != torch.float32)
                assert torch.equal(torch.tensor(got, dtype=torch.float32).to(dt), want[r]), (n, dt, r)


@pytest.mark.parametrize("scheme", list(OPS))
def test_pure_ste(scheme):
    w = make_weight(8, 256, torch.bfloat16, 64, seed=6)
    gout = torch.randn_like(w)
    got = _grads(lambda t: OPS[scheme](t, 64, ste="pure"), w, gout)
    assert torch.equal(got, gout)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(_grads(lambda t: aq.fake_quant_fp8_rows(t, ste="pure"), x, gout[:4, :64]),
                       gout[:4, :64])


# ---------------------------------------------------------------------------
# quantize_int4 round trip and AWQ invariants
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", list(OPS))
@pytest.mark.parametrize("mode", ["torchao", "awq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_roundtrip(scheme, mode, dtype):
    g = 64
    w = make_weight(24, 512, dtype, g, seed=8)
    if dtype == torch.float16 and scheme == "fp8_int4":
        w[1] = 1.0  # no fp16 scale underflow rows here: torchao itself gives NaN there
    codes, scales, zeros = aq.quantize_int4(w, g, scheme=scheme, mode=mode)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert int(codes.max()) <= 15
    deq = aq.dequantize_int4(codes, scales, zeros, scheme=scheme, mode=mode, dtype=dtype)
    assert_bits_equal(deq, OPS[scheme](w, g, mode=mode), f"roundtrip {scheme} {mode} {dtype}")
    rc, rs, rz = ref.codes_scales_zeros(w, g, scheme, mode == "awq")
    assert torch.equal(codes, rc)
    assert torch.equal(scales.float(), rs.float())
    assert torch.equal(zeros.float(), rz.float())
    # independent dequantize: (q - z) * s in fp32 for the integer-zero modes
    if not (scheme == "int4_asym" and mode == "torchao"):
        q = codes.float().view(24, -1, g)
        mine = ((q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).view_as(w).to(dtype)
        assert_bits_equal(mine, OPS[scheme](w, g, mode=mode), "independent dequant")
    if mode == "awq":
        assert scales.dtype == torch.float16 and zeros.dtype == torch.uint8
        assert int(zeros.max()) <= 15
        if scheme == "fp8_int4":
            assert torch.all(zeros == 8)


def test_quantize_rejects_overflow_and_nonfinite():
    w = torch.randn(8, 64)
    w[0, 0] = 2e6  # int4_asym: range / 15 > 65504
    with pytest.raises(ValueError, match="overflows"):
        aq.quantize_int4(w, 32, scheme="int4_asym", mode="awq")
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        aq.quantize_int4(w, 32)


def test_pack_awq_order():
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1)  # channels 0..7 of column k=0
    assert torch.ops.ao_awq.pack_awq(codes).item() == 0x75316420
    packed = aq.pack_awq(codes.repeat(2, 3))  # N=16, K=3
    assert packed.shape == (3, 2) and torch.all(packed == 0x75316420)
    c = torch.randint(0, 16, (64, 40), dtype=torch.uint8)
    p = aq.pack_awq(c)
    # independent unpack
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    un = torch.stack([(p >> (4 * order[j])) & 0xF for j in range(8)], -1)  # [K, N/8, 8]
    assert torch.equal(un.reshape(40, 64).t().to(torch.uint8), c)


# ---------------------------------------------------------------------------
# rejected input
# ---------------------------------------------------------------------------
def test_fake_kernels_check_what_the_kernels_check():
    """Under fake tensors (torch.compile's tracing) the raw ops refuse what
    the C kernels refuse, at trace time."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        for shape in ((), (1,) * 9):
            x = torch.empty(shape)
            with pytest.raises(RuntimeError, match="x must have 1 to 8 dimensions"):
                torch.ops.ao_awq.fp8_rows(x, False, -1)
            with pytest.raises(RuntimeError, match="x must have 1 to 8 dimensions"):
                torch.ops.ao_awq.fp8_rows_backward(x, x, False, -1)
    for shape in ((), (1,) * 9):  # the kernels
        with pytest.raises(RuntimeError, match="x must have 1 to 8 dimensions"):
            torch.ops.ao_awq.fp8_rows(torch.zeros(shape), False, -1)


BAD = [
    (lambda: aq.fake_quant_fp8_int4(torch.randn(8, 128, dtype=torch.float64)), TypeError, "dtype"),
    (lambda: aq.fake_quant_fp8_int4(torch.randn(128)), ValueError, "2-D"),
    (lambda: aq.fake_quant_int4_asym(torch.randn(2, 8, 128)), ValueError, "2-D"),
    (lambda: aq.fake_quant_fp8_int4(torch.randn(8, 100)), ValueError, "multiple of group_size"),
    (lambda: aq.fake_quant_fp8_int4(torch.randn(8, 96), 48), ValueError, "group_size must be one of"),
    (lambda: aq.fake_quant_fp8_int4(torch.randn(0, 128)), ValueError, "empty"),
    (lambda: aq.fake_quant_fp8_int4(torch.randn(8, 128), mode="gptq"), ValueError, "mode"),
    (lambda: aq.fake_quant_fp8_int4(torch.randn(8, 128), ste="lsq"), ValueError, "ste"),
    (lambda: aq.fake_quant_fp8_int4([[1.0]]), TypeError, "torch.Tensor"),
    (lambda: aq.fake_quant_fp8_int4(torch.randn(8, 128), 128.0), TypeError, "group_size"),
    (lambda: aq.quantize_int4(torch.randn(8, 128), scheme="nf4"), ValueError, "scheme"),
    (lambda: aq.fake_quant_fp8_rows(torch.randn(4, 8).to(torch.int32)), TypeError, "dtype"),
    (lambda: aq.pack_awq(torch.zeros(12, 4, dtype=torch.uint8)), ValueError, "multiple of 8"),
    (lambda: aq.pack_awq(torch.zeros(8, 4, dtype=torch.int32)), TypeError, "uint8"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_rejected_input(i):
    fn, exc, msg = BAD[i]
    with pytest.raises(exc, match=msg):
        fn()


def test_op_level_checks_raise_not_crash():
    # the C layer re-checks what Python checks: a RuntimeError, never a crash
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        torch.ops.ao_awq.fq_weight(torch.randn(4, 100), 64, 0, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.ao_awq.fq_weight(torch.randn(128, 64).t(), 64, 0, False)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.ao_awq.fq_weight(torch.randn(4, 64, dtype=torch.float64), 64, 0, False)


# ---------------------------------------------------------------------------
# registration: opcheck, compile, export
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    for n, k, g in [(8, 128, 32), (5, 256, 128)]:
        w = torch.randn(n, k, dtype=dtype) * 0.1
        for scheme in (0, 1):
            for awq in (False, True):
                for pure in (False, True):
                    torch.library.opcheck(torch.ops.ao_awq.fq_weight,
                                          (w.clone().requires_grad_(), g, scheme, awq, pure))
                torch.library.opcheck(torch.ops.ao_awq.quantize, (w, g, scheme, awq))
                torch.library.opcheck(torch.ops.ao_awq.fq_weight_backward,
                                      (torch.randn_like(w), w, g, scheme, awq))
        x = torch.randn(3, n, k, dtype=dtype)
        torch.library.opcheck(torch.ops.ao_awq.fp8_rows, (x.clone().requires_grad_(), False))
        torch.library.opcheck(torch.ops.ao_awq.fp8_rows_backward, (torch.randn_like(x), x))
    torch.library.opcheck(torch.ops.ao_awq.pack_awq,
                          (torch.randint(0, 16, (16, 24), dtype=torch.uint8),))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def f(w, x):
        wq = aq.fake_quant_fp8_int4(w, 64) + aq.fake_quant_int4_asym(w, 64, mode="awq")
        return torch.nn.functional.linear(aq.fake_quant_fp8_rows(x), wq)

    w = torch.randn(32, 128, requires_grad=True)
    x = torch.randn(4, 128)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(w, x)
    assert torch.equal(out, f(w, x))
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_torch_export_captures_ops():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 64))

        def forward(self, x):
            return x @ aq.fake_quant_int4_asym(self.w, 32, mode="awq").t()

    ep = torch.export.export(M(), (torch.randn(2, 64),))
    assert "ao_awq.fq_weight" in str(ep.graph)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_quantize_dequantize_pack(dynamic):
    """quantize_int4 checks the scales' values (NaN/Inf, fp16 overflow), which
    tracing cannot read: under torch.compile/torch.export it runs as one opaque
    op that checks at run time, so fullgraph works and the error is the same."""
    torch._dynamo.reset()

    def f(w, scheme, mode):
        codes, scales, zeros = aq.quantize_int4(w, 64, scheme=scheme, mode=mode)
        back = aq.dequantize_int4(codes, scales, zeros, scheme=scheme, mode=mode, dtype=w.dtype)
        return codes, scales, zeros, back, aq.pack_awq(codes)

    for scheme in aq.SCHEMES:
        for mode in aq.MODES:
            cf = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")
            for n in (16, 24):
                w = torch.randn(n, 128, dtype=torch.bfloat16)
                got, want = cf(w, scheme, mode), f(w, scheme, mode)
                assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))
                assert torch.equal(got[3], (aq.fake_quant_int4_asym if scheme == "int4_asym"
                                            else aq.fake_quant_fp8_int4)(w, 64, mode=mode))
    w = torch.randn(16, 128)
    w[3, 70] = float("inf")
    cq = torch.compile(lambda w: aq.quantize_int4(w, 64, scheme="fp8_int4", mode="awq"),
                       fullgraph=True, dynamic=dynamic, backend="aot_eager")
    with pytest.raises(ValueError, match=r"w: contains NaN or Inf \(first at \[3, 70\]\)"):
        cq(w)
    big = torch.full((8, 64), 1e6)
    big[:, ::2] = -1e6
    with pytest.raises(ValueError, match="float16 scale of row 0, group 0"):
        cq(big)


def test_torch_export_and_opcheck_quantize():
    class M(torch.nn.Module):
        def forward(self, w):
            return aq.quantize_int4(w, 32, scheme="int4_asym", mode="torchao")

    ep = torch.export.export(M(), (torch.randn(16, 64),))
    assert "ao_awq.quantize_int4_checked" in str(ep.graph)
    w = torch.randn(16, 64)
    got = ep.module()(w)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, M()(w)))
    for scheme in aq.SCHEMES:
        for mode in aq.MODES:
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                torch.library.opcheck(torch.ops.ao_awq.quantize_int4_checked,
                                      (torch.randn(16, 128, dtype=dt), 64, scheme, mode, "w"))


def test_aoti_package_runs_the_ops(tmp_path):
    """AOTInductor: an exported program with every op (quantize_int4 through
    its run-time-checked op) compiles to a package whose outputs are ours."""
    class M(torch.nn.Module):
        def forward(self, x, w):
            return (aq.fake_quant_fp8_rows(x), aq.fake_quant_fp8_int4(w, 64, mode="awq"),
                    aq.fake_quant_int4_asym(w, 64), *aq.quantize_int4(w, 64, scheme="int4_asym",
                                                                      mode="awq"))

    x, w = torch.randn(4, 128), torch.randn(16, 128, dtype=torch.bfloat16)
    ep = torch.export.export(M(), (x, w))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    run = torch._inductor.aoti_load_package(path)
    x, w = torch.randn(4, 128), torch.randn(16, 128, dtype=torch.bfloat16)
    got, want = run(x, w), M()(x, w)
    assert len(got) == len(want) == 6
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))


def test_compile_inductor_dynamic_sequence_lengths():
    """Training with varying sequence lengths recompiles with dynamic shapes:
    the fake kernels must take symbolic sizes; inductor's graph stays exact."""
    torch._dynamo.reset()

    def f(w, x):
        wq = aq.fake_quant_fp8_int4(w, 64, mode="awq") + aq.fake_quant_int4_asym(w, 64)
        return aq.fake_quant_fp8_rows(x), wq

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for n, t in ((16, 3), (24, 7), (32, 11)):
        w = torch.randn(n, 128, requires_grad=True)
        x = torch.randn(2, t, 128, requires_grad=True)
        got, want = cf(w, x), f(w, x)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        gx, gw = torch.autograd.grad(got[0].sum() + got[1].sum(), (x, w))
        ex, ew = torch.autograd.grad(want[0].sum() + want[1].sum(), (x, w))
        assert torch.equal(gx, ex) and torch.equal(gw, ew)


def test_fp16_tiny_and_zero_groups_have_finite_gradients():
    """fp16, fp8-int4: a group scale below 1/65504 has an infinite fp16
    reciprocal (torchao: NaN/inf gradients); ours stay finite and equal to
    torch wherever torch is finite."""
    w = (torch.randn(8, 256) * 0.02).to(torch.float16)
    w[0, :64] = 0.0
    w[1, 64:128] *= 1e-4
    w[2] *= 1e-3
    gout = torch.randn_like(w)
    for mode in ("torchao", "awq"):
        got = _grads(lambda t: aq.fake_quant_fp8_int4(t, 64, mode=mode), w, gout)
        assert torch.isfinite(got).all(), mode
    ours = _grads(lambda t: aq.fake_quant_fp8_int4(t, 64), w, gout)
    theirs = _grads(lambda t: torchao_fq(t, 64, "fp8_int4"), w, gout)
    fin = torch.isfinite(theirs).all(-1)
    assert not fin.all()  # torchao does give non-finite gradients here
    check_grads(ours[fin], theirs[fin], w[fin], 64, "fp8_int4", "fp16 finite rows")


def test_fp8_rows_many_dims():
    x = torch.randn([1] * 10 + [3, 64])
    out = aq.fake_quant_fp8_rows(x)
    assert out.shape == x.shape and out.is_contiguous()
    assert_bits_equal(out.view(-1, 64), aq.fake_quant_fp8_rows(x.view(-1, 64)), "12-D rows")


def test_op_rejects_bad_group_size_and_scheme():
    w = torch.randn(4, 96)
    for g in (16, 48, 96, 512):
        with pytest.raises(RuntimeError, match="group_size"):
            torch.ops.ao_awq.fq_weight_backward(w, w, g, 0, False)
        with pytest.raises(RuntimeError, match="group_size"):
            torch.ops.ao_awq.fq_weight(w, g, 0, False)
    w = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="scheme"):
        torch.ops.ao_awq.quantize(w, 32, 7, False)
    with pytest.raises(RuntimeError, match="scheme"):
        torch.ops.ao_awq.fq_weight_backward(w, w, 32, 7, False)
    with pytest.raises(RuntimeError, match="like x"):
        torch.ops.ao_awq.fp8_rows_backward(torch.randn(64, 4), torch.randn(4, 64))


def test_double_backward_raises():
    w = torch.randn(8, 64, requires_grad=True)
    y = aq.fake_quant_int4_asym(w, 32)
    (g,) = torch.autograd.grad((y ** 2).sum(), w, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


def test_import_under_inference_mode():
    import subprocess
    import sys
    code = ("import torch\nwith torch.inference_mode():\n    import ao_awq_export as aq\n"
            "    print(aq.fake_quant_fp8_int4(torch.randn(8, 128), 128).shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_probe_ignores_default_dtype_and_bad_probe_input():
    """The sum-order probe must not depend on the importer's default dtype;
    torch_sum takes a buffer (never a raw address)."""
    import subprocess
    import sys

    code = ("import torch; torch.set_default_dtype(torch.float64); "
            "import ao_awq_export.ops as o; print(o.TORCH_SUM_VW, o.TORCH_SUM_HALF)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(aq.ops.TORCH_SUM_VW), str(aq.ops.TORCH_SUM_HALF)]
    from ao_awq_export import _C

    with pytest.raises(TypeError):
        _C.torch_sum(4096, 8, False)
    with pytest.raises(ValueError, match="float32"):
        _C.torch_sum(b"abc", 8, False)
    with pytest.raises(ValueError, match="power of two"):
        _C.torch_sum(b"", 7, False)
    assert _C.torch_sum(aq.ops._as_buffer(torch.ones(100)), 8, False) == 100.0
    for bad in (7, 2, 64, -8):
        with pytest.raises(ValueError, match="power of two"):
            _C.set_torch_sum(bad, True)
    with pytest.raises(TypeError):
        _C.set_torch_sum("8", True)


def test_fake_kernels_check_arguments():
    w = torch.randn(4, 128)
    with pytest.raises(RuntimeError, match="grad must match w"):
        torch.ops.ao_awq.fq_weight_backward(torch.empty(4, 128, device="meta"), w, 64, 1, True)
    with pytest.raises(RuntimeError, match="grad must match x"):
        torch.ops.ao_awq.fp8_rows_backward(torch.empty(4, 128, device="meta"), w)
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        torch.ops.ao_awq.fq_weight(torch.empty(4, 96, device="meta"), 64, 1, True)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.ao_awq.pack_awq(torch.empty(4, 128, dtype=torch.uint8, device="meta"))
    out = torch.ops.ao_awq.fq_weight(torch.empty(4, 128, device="meta"), 64, 1, True)
    assert out.device.type == "meta" and out.shape == (4, 128)


def test_grad_single_long_row_two_pass_reduction():
    """A 1-row weight / activation with K >= 32768: torch splits that sum
    across its threads (two-pass reduction); the kernel follows it."""
    if not torch_order(torch.float32):
        pytest.skip("torch's CPU sum order not recognised")
    rows = Float8FakeQuantizer(Float8FakeQuantizeConfig(dtype=torch.float8_e4m3fn,
                                                        granularity=PerRow()))
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for K, seed in ((40960, 0), (65536, 1)):
                gen = torch.Generator().manual_seed(seed)
                w = torch.randn(1, K, generator=gen)
                gout = torch.randn(1, K, generator=gen) * 1e3
                for fn, ref_fn in ((lambda t: aq.fake_quant_fp8_int4(t, 128),
                                    lambda t: torchao_fq(t, 128, "fp8_int4")),
                                   (aq.fake_quant_fp8_rows, rows)):
                    ours, theirs = _grads(fn, w, gout), _grads(ref_fn, w, gout)
                    assert torch.equal(bits(ours), bits(theirs)), (threads, K)
    finally:
        torch.set_num_threads(old)
