"""Public fake-quant / quantize / pack API over the ao_awq:: C operators.

The C extension registers the operators with PyTorch's dispatcher on import;
this module adds what is Python's job: argument checking with clear errors,
fake (meta) implementations for torch.compile / torch.export, and the
autograd formulas (whose backward is again a C kernel).
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.ao_awq.*)

__all__ = [
    "fake_quant_fp8_int4",
    "fake_quant_int4_asym",
    "fake_quant_fp8_rows",
    "quantize_int4",
    "dequantize_int4",
    "pack_awq",
    "GROUP_SIZES",
    "SCHEMES",
    "MODES",
]

GROUP_SIZES = (32, 64, 128, 256)
SCHEMES = {"fp8_int4": 0, "int4_asym": 1}
MODES = ("torchao", "awq")
STES = ("autograd", "pure")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ops = torch.ops.ao_awq
HAS_CUDA = bool(_C.built_with_cuda())  # a constant, so torch.compile never calls into _C


def _clamp_backward_is_strict() -> bool:
    """torch <= 2.13 passes clamp's gradient at the bounds (lo <= x <= hi);
    torch 2.14 stopped (lo < x < hi).  "The gradient torch autograd computes
    through torchao's formula" follows the running torch, so we ask it."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([0.0, 1.0], device="cpu", requires_grad=True)
        (g,) = torch.autograd.grad(x.clamp(0.0, 1.0).sum(), x)
    return bool((g == 0).all())


CLAMP_STRICT = _clamp_backward_is_strict()


def _as_buffer(t):
    """A bytes-like view of a contiguous CPU tensor (no numpy needed)."""
    import ctypes

    buf = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    buf.keep = t  # the tensor lives as long as the view
    return buf


def _probe_torch_sum_order():
    """(vw, half_ok): the float lanes of the running torch's CPU sum kernel,
    found by comparing torch.sum with the C emulation of ATen's cascade_sum
    for each candidate width (0: none matched, keep the canonical order), and
    whether its bf16/fp16 sums (two halves of a 2*vw load added first) match
    too.  torchao-mode CPU backwards then sum the group/row terms the way
    torch autograd does, so the extremes get torch's gradient bit for bit."""
    def matches(t, vw, half):
        ref = t.sum(-1)
        xf = t.float().contiguous()
        for r in range(t.shape[0]):
            got = torch.tensor(_C.torch_sum(_as_buffer(xf[r]), vw, half), dtype=torch.float32,
                               device="cpu")
            if not torch.equal(got.to(t.dtype), ref[r]):
                return False
        return True

    try:  # independent of the caller's default dtype / device
        kw = dict(dtype=torch.float32, device="cpu")
        gen = torch.Generator(device="cpu").manual_seed(1234)
        n_rows = 48
        x = torch.randn(n_rows, 1000, generator=gen, **kw) * torch.exp(
            2 * torch.randn(n_rows, 1000, generator=gen, **kw))
        with torch.no_grad():
            for vw in (8, 16, 4, 32):
                if all(matches(x[:, :n], vw, False) for n in (37, 256, 1000)):
                    half = all(matches(x[:, :n].to(dt), vw, True)
                               for n in (77, 256, 1000) for dt in (torch.bfloat16, torch.float16))
                    return vw, half
    except Exception:  # noqa: BLE001  (a probe must never break the import)
        pass
    return 0, False


TORCH_SUM_VW, TORCH_SUM_HALF = _probe_torch_sum_order()
_C.set_torch_sum(TORCH_SUM_VW, TORCH_SUM_HALF)


# --------------------------------------------------------------------------
# argument checks (Python exceptions naming the argument and the rule)
# --------------------------------------------------------------------------
def _check_tensor(name, t, *, dims=None, empty_rows_ok=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype bfloat16, float16 or float32, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D [N, K] (out_features x in_features), got shape "
                         f"{tuple(t.shape)}")
    if t.numel() == 0 and not (empty_rows_ok and t.dim() >= 1 and t.shape[-1] > 0):
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name} must be on a cpu or cuda device, got {t.device}")
    if t.device.type == "cuda" and not HAS_CUDA:
        raise ValueError(f"{name} is on {t.device} but ao_awq_export was built without CUDA "
                         "kernels (rebuild with nvcc and a CUDA torch present)")


def _check_group_size(group_size, allowed=GROUP_SIZES, what=""):
    """group_size is an int (not a bool, float or numpy scalar) in `allowed`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size not in allowed:
        raise ValueError(f"group_size must be one of {allowed}{what}, got {group_size!r}")


def _check_group(w, group_size):
    _check_group_size(group_size)
    if w.shape[1] % group_size:
        raise ValueError(f"w.shape[1] (K = {w.shape[1]}) must be a multiple of group_size "
                         f"({group_size})")


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_weight(w, group_size, mode, ste="autograd"):
    _check_tensor("w", w, dims=2)
    _check_group(w, group_size)
    _check_choice("mode", mode, MODES)
    _check_choice("ste", ste, STES)


# --------------------------------------------------------------------------
# fake (meta) implementations
# --------------------------------------------------------------------------
# The fakes check what the C kernels check, so that tracing (torch.compile,
# torch.export) reports bad arguments and a mixed meta/real call (which the
# dispatcher routes here) raises instead of returning uninitialised memory.
def _fake_check_weight(w, group_size, name="w"):
    torch._check(w.dtype in _FLOAT_DTYPES, lambda: f"{name} must be bf16/fp16/fp32, got {w.dtype}")
    torch._check(w.dim() == 2, lambda: f"{name} must be 2-D [N, K], got {w.dim()}-D")
    torch._check(group_size in GROUP_SIZES,
                 lambda: f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    torch._check(w.shape[1] % group_size == 0,
                 lambda: f"{name}.shape[1] must be a multiple of group_size ({group_size})")


def _fake_check_pair(grad, t, name):
    torch._check(grad.device == t.device and grad.dtype == t.dtype and grad.shape == t.shape,
                 lambda: f"grad must match {name} (device, dtype, shape): got {grad.device} "
                         f"{grad.dtype} {tuple(grad.shape)} and {t.device} {t.dtype} "
                         f"{tuple(t.shape)}")


@torch.library.register_fake("ao_awq::fq_weight")
def _fq_weight_fake(w, group_size, scheme, awq, pure_ste=False, div_mode=-1):
    _fake_check_weight(w, group_size)
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.register_fake("ao_awq::fq_weight_backward")
def _fq_weight_backward_fake(grad, w, group_size, scheme, awq, clamp_strict=False, div_mode=-1):
    _fake_check_weight(w, group_size)
    _fake_check_pair(grad, w, "w")
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.register_fake("ao_awq::quantize")
def _quantize_fake(w, group_size, scheme, awq, div_mode=-1):
    _fake_check_weight(w, group_size)
    n, k = w.shape
    return (w.new_empty((n, k), dtype=torch.uint8),
            w.new_empty((n, k // group_size), dtype=torch.float32),
            w.new_empty((n, k // group_size), dtype=torch.float32))


@torch.library.register_fake("ao_awq::fp8_rows")
def _fp8_rows_fake(x, pure_ste=False, div_mode=-1):
    torch._check(x.dtype in _FLOAT_DTYPES, lambda: f"x must be bf16/fp16/fp32, got {x.dtype}")
    torch._check(1 <= x.dim() <= 8, lambda: f"x must have 1 to 8 dimensions, got {x.dim()}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ao_awq::fp8_rows_backward")
def _fp8_rows_backward_fake(grad, x, clamp_strict=False, div_mode=-1):
    torch._check(1 <= x.dim() <= 8, lambda: f"x must have 1 to 8 dimensions, got {x.dim()}")
    _fake_check_pair(grad, x, "x")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ao_awq::pack_awq")
def _pack_awq_fake(codes):
    torch._check(codes.dtype == torch.uint8 and codes.dim() == 2,
                 lambda: f"codes must be 2-D uint8, got {codes.dim()}-D {codes.dtype}")
    torch._check(codes.shape[0] % 8 == 0, lambda: "codes.shape[0] must be a multiple of 8")
    r, c = codes.shape
    return codes.new_empty((c, r // 8), dtype=torch.int32)


# --------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------
def _fq_setup(ctx, inputs, output):
    args = list(inputs)
    args += [False, -1][len(args) - 4:]  # schema defaults, should the dispatcher omit them
    w, group_size, scheme, awq, pure_ste, div_mode = args
    ctx.cfg = (group_size, scheme, awq, pure_ste, div_mode)
    ctx.save_for_backward(None if pure_ste else w)


def _fq_backward(ctx, grad):
    group_size, scheme, awq, pure_ste, div_mode = ctx.cfg
    if pure_ste:
        gw = grad
    else:
        (w,) = ctx.saved_tensors
        gw = _ops.fq_weight_backward(grad.contiguous(), w, group_size, scheme, awq, CLAMP_STRICT,
                                     div_mode)
    return gw, None, None, None, None, None


torch.library.register_autograd("ao_awq::fq_weight", _fq_backward, setup_context=_fq_setup)


def _rows_setup(ctx, inputs, output):
    args = list(inputs)
    args += [False, -1][len(args) - 1:]
    x, pure_ste, div_mode = args
    ctx.cfg = (pure_ste, div_mode)
    ctx.save_for_backward(None if pure_ste else x)


def _rows_backward(ctx, grad):
    pure_ste, div_mode = ctx.cfg
    if pure_ste:
        return grad, None, None
    (x,) = ctx.saved_tensors
    return _ops.fp8_rows_backward(grad.contiguous(), x, CLAMP_STRICT, div_mode), None, None


torch.library.register_autograd("ao_awq::fp8_rows", _rows_backward, setup_context=_rows_setup)


def _no_double_backward(ctx, grad):
    raise NotImplementedError("ao_awq_export: double backward (gradient of a gradient) through the "
                              "fake-quant ops is not supported")


for _op in ("ao_awq::fq_weight_backward", "ao_awq::fp8_rows_backward"):
    torch.library.register_autograd(_op, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def fake_quant_fp8_int4(w: torch.Tensor, group_size: int = 128, *, mode: str = "torchao",
                        ste: str = "autograd") -> torch.Tensor:
    """fp8-then-int4 symmetric weight fake quant (SPEC section 1).

    mode="torchao": bit-identical to torchao's Int4WeightFakeQuantizer with
    activation_dtype=float8_e4m3fn.  mode="awq": same codes, dequantized with
    the fp16 scale an AWQ checkpoint stores (zero point 8): exports losslessly.
    ste="autograd": the gradient torch autograd computes through torchao's
    formula (note: it casts the gradient to float8 on the way, as torchao
    does); ste="pure": the gradient passes through unchanged.
    """
    _check_weight(w, group_size, mode, ste)
    return _ops.fq_weight(w.contiguous(), group_size, 0, mode == "awq", ste == "pure")


def fake_quant_int4_asym(w: torch.Tensor, group_size: int = 128, *, mode: str = "torchao",
                         ste: str = "autograd") -> torch.Tensor:
    """int4 asymmetric [0, 15] weight fake quant (SPEC section 2).

    mode="torchao": bit-identical to torchao's Int4WeightFakeQuantizer with
    activation_dtype=bfloat16 (float zero point).  mode="awq": integer zero
    point and fp16 scale (SPEC section 4), exported losslessly.
    """
    _check_weight(w, group_size, mode, ste)
    return _ops.fq_weight(w.contiguous(), group_size, 1, mode == "awq", ste == "pure")


def fake_quant_fp8_rows(x: torch.Tensor, *, ste: str = "autograd") -> torch.Tensor:
    """Per-row (last dim) fp8 e4m3 activation fake quant, eps 1e-12: an
    all-zero row gives zeros (torchao gives NaN).  Any leading dims."""
    _check_tensor("x", x, empty_rows_ok=True)  # no rows (an empty batch) is fine
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension")
    _check_choice("ste", ste, STES)
    if x.numel() == 0:
        return x.clone()
    x2 = x.contiguous().reshape(-1, x.shape[-1])
    y = _ops.fp8_rows(x2, ste == "pure").view(x.shape)
    if not x.is_contiguous():
        # laid out like x, as torchao's elementwise result is (a matmul after
        # it sums in an order its strides decide)
        y = torch.empty_like(x).copy_(y)
    return y


def _scale_dtype(scheme, mode, wdtype):
    if mode == "awq":
        return torch.float16
    return wdtype if scheme == "fp8_int4" else torch.float32


def quantize_int4(w: torch.Tensor, group_size: int = 128, *, scheme: str = "fp8_int4",
                  mode: str = "torchao"):
    """The exact integers the fake quant uses.

    Returns (codes, scales, zeros):
      codes  uint8 [N, K] in [0, 15] (for fp8_int4: signed code + 8);
      scales [N, K/g]: fp16 in awq mode, w.dtype for fp8_int4/torchao,
             float32 for int4_asym/torchao;
      zeros  [N, K/g]: uint8 integer zero points, except int4_asym/torchao
             whose zero is torchao's float offset (float32).
    dequantize_int4(codes, scales, zeros, ...) reproduces the fake-quant
    output bit for bit.  Non-finite weights and fp16 scale overflow raise.
    """
    return _quantize_int4(w, group_size, scheme, mode, "w")


def _quantize_int4(w, group_size, scheme, mode, name):
    """quantize_int4, with errors naming the weight `name`."""
    _check_choice("scheme", scheme, SCHEMES)
    _check_weight(w, group_size, mode)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    w = w.detach()  # integers: nothing to differentiate
    if torch.compiler.is_compiling():
        # the finiteness check reads values, which tracing cannot: the whole
        # quantization runs as one opaque op there, raising as it does eagerly
        return _quantize_int4_op(w, group_size, scheme, mode, name)
    return _quantize_int4_eager(w, group_size, scheme, mode, name)


def _quantize_int4_eager(w, group_size, scheme, mode, name):
    w = w.contiguous()
    codes, scales, zeros = _ops.quantize(w, group_size, SCHEMES[scheme], mode == "awq")
    # A NaN/Inf weight always makes its group's (int4_asym) or row's (fp8_int4)
    # scale non-finite, so checking the K/g-times smaller scales is enough;
    # the full scan of w only runs to word the error.
    if w.device.type != "meta" and not bool(torch.isfinite(scales).all()):
        row, grp = (~torch.isfinite(scales)).nonzero()[0].tolist()
        where = f"row {row}, group {grp} (columns {grp * group_size}..{(grp + 1) * group_size - 1})"
        if not bool(torch.isfinite(w).all()):
            r, c = (~torch.isfinite(w)).nonzero()[0].tolist()
            raise ValueError(f"{name}: contains NaN or Inf (first at [{r}, {c}]): int4 "
                             "quantization needs finite weights")
        limit = ("the group's range max - min must stay below about 9.8e5" if scheme == "int4_asym"
                 else "the group's max |w| must stay below about 5.2e5")
        # an fp16 weight's scales always fit fp16 (|w| <= 65504): there the
        # overflow is the arithmetic's in fp16 (the fp8 round trip at 65504)
        if mode == "awq" and w.dtype != torch.float16:
            raise ValueError(f"{name}: the float16 scale of {where} overflows (|w| too large for "
                             f"an AWQ fp16 scale: {limit})")
        raise ValueError(f"{name}: the quantization of {where} overflows {w.dtype} (|w| too close "
                         f"to the largest {w.dtype} value for {scheme}/{mode}'s arithmetic in "
                         "that dtype)")
    sdt = _scale_dtype(scheme, mode, w.dtype)
    scales = scales.to(sdt)
    if scheme == "int4_asym" and mode == "torchao":
        zeros = zeros.to(torch.float32)
    else:
        zeros = zeros.to(torch.uint8)
    return codes, scales, zeros


@torch.library.custom_op("ao_awq::quantize_int4_checked", mutates_args=())
def _quantize_int4_op(w: torch.Tensor, group_size: int, scheme: str, mode: str,
                      name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_int4 for torch.compile / torch.export (arguments already checked)."""
    return _quantize_int4_eager(w, group_size, scheme, mode, name)


@_quantize_int4_op.register_fake
def _quantize_int4_op_fake(w, group_size, scheme, mode, name):
    _fake_check_weight(w, group_size)
    torch._check(scheme in SCHEMES and mode in MODES,
                 lambda: f"scheme/mode must be in {tuple(SCHEMES)}/{MODES}, got {scheme}/{mode}")
    n, k = w.shape
    zdt = torch.float32 if (scheme, mode) == ("int4_asym", "torchao") else torch.uint8
    return (w.new_empty((n, k), dtype=torch.uint8),
            w.new_empty((n, k // group_size), dtype=_scale_dtype(scheme, mode, w.dtype)),
            w.new_empty((n, k // group_size), dtype=zdt))


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
                    scheme: str = "fp8_int4", mode: str = "torchao",
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of quantize_int4: the fake-quant output, bit for bit when
    `dtype` is the weight's dtype (default bfloat16)."""
    _check_choice("scheme", scheme, SCHEMES)
    _check_choice("mode", mode, MODES)
    for nm, t in (("codes", codes), ("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{nm} must be 2-D, got shape {tuple(t.shape)}")
        if t.device != codes.device:
            raise ValueError(f"{nm} is on {t.device}, codes on {codes.device}: same device needed")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8 (quantize_int4's codes), got {codes.dtype}")
    if scales.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if scheme == "int4_asym" and mode == "torchao":
        if zeros.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"zeros must be floating point for int4_asym/torchao (torchao's float "
                            f"zero point), got {zeros.dtype}")
    elif zeros.dtype != torch.uint8:
        raise TypeError(f"zeros must be uint8 integer zero points for {scheme}/{mode} "
                        f"(quantize_int4's zeros), got {zeros.dtype}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    n, k = codes.shape
    if n == 0 or k == 0:
        raise ValueError(f"codes must not be empty, got shape {tuple(codes.shape)}")
    G = scales.shape[1]
    if G == 0 or k % G or k // G not in GROUP_SIZES:
        raise ValueError(f"scales must be [N, K/g] for codes [N, K] = {tuple(codes.shape)} with "
                         f"g in {GROUP_SIZES}, got {tuple(scales.shape)}")
    if tuple(scales.shape) != (n, G) or tuple(zeros.shape) != (n, G):
        raise ValueError(f"scales and zeros must both be [N, K/g] = [{n}, {G}], got "
                         f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
    g = k // G
    q = codes.to(torch.float32).view(n, -1, g)
    s = scales.to(torch.float32).unsqueeze(-1)
    z = zeros.to(torch.float32).unsqueeze(-1)
    if scheme == "int4_asym" and mode == "torchao":
        out = (q - 8.0) * s + z
    else:
        out = (q - z) * s
    return out.view(n, k).to(dtype)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes [N, K] (values 0..15) into AWQ's int32 [K, N/8]
    (transposed; 8 output channels per word in AWQ's order 0,2,4,6,1,3,5,7).
    Also packs zeros [N, K/g] into qzeros [K/g, N/8].  Only the low 4 bits
    of each code are used."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.numel() == 0:
        raise ValueError(f"codes must not be empty, got shape {tuple(codes.shape)}")
    if codes.shape[0] % 8:
        raise ValueError(f"codes.shape[0] (N = {codes.shape[0]}) must be a multiple of 8 "
                         "(AWQ packs 8 output channels per int32)")
    if codes.device.type == "cuda" and not HAS_CUDA:
        raise ValueError("codes is on cuda but ao_awq_export was built without CUDA kernels")
    return _ops.pack_awq(codes.contiguous())
