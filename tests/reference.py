"""Independent references, written with plain torch ops (no project code).

Each function follows SPEC.md step by step with the dtype of every
intermediate, and is differentiable: the gradient torch autograd computes
through it is the reference gradient.  `cuda=True` emulates on the CPU how
torch on CUDA evaluates `tensor / python_scalar` (multiplication by the
float reciprocal), which is what torchao computes when run on a GPU.
"""
import numpy as np
import torch

E4M3 = torch.float8_e4m3fn


class RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class RoundToF8(torch.autograd.Function):
    """x.to(float8) with a straight-through backward (as torchao's)."""

    @staticmethod
    def forward(ctx, x):
        return x.to(E4M3)

    @staticmethod
    def backward(ctx, g):
        return g


class F16STE(torch.autograd.Function):
    """fp32 value rounded to the nearest fp16, straight-through backward."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def div_scalar(t, c, cuda=False):
    if cuda:
        return t * float(np.float32(1.0) / np.float32(c))
    return t / c


def fp8_rows(x, cuda=False, lb=1e-12):
    """Per-row fp8 round trip: D(fp32(e4m3(clamp(x/s))) * s), s = D(amax/448)."""
    a = x.abs().amax(-1, keepdim=True)
    if lb is not None:
        a = torch.clamp(a, min=lb)
    s = div_scalar(a, 448.0, cuda).to(torch.float32)
    t = (x.to(torch.float32) / s).clamp(-448.0, 448.0)
    return (RoundToF8.apply(t).to(torch.float32) * s).to(x.dtype)


def fp8_int4(w, g, awq=False, cuda=False):
    n, k = w.shape
    wd = fp8_rows(w, cuda=cuda and not awq).view(n, k // g, g)
    m = wd.abs().amax(-1)
    sg = torch.clamp(m / 8, min=1e-6)
    r = (1.0 / sg).unsqueeze(-1)
    zero = torch.zeros_like(sg).unsqueeze(-1)
    q = torch.clamp(RoundSTE.apply(wd * r) + zero, -8, 7)
    if awq:
        s16 = F16STE.apply(sg.to(torch.float32)).unsqueeze(-1)
        out = (q.to(torch.float32) * s16).to(w.dtype)
    else:
        out = (q - zero) * sg.unsqueeze(-1)
    return out.reshape(n, k).to(w.dtype)


def int4_asym(w, g, awq=False, cuda=False):
    n, k = w.shape
    x = w.to(torch.float32).view(n, k // g, g)
    mx = x.amax(-1, keepdim=True)
    mn = x.amin(-1, keepdim=True)
    if awq:
        s = torch.clamp(mx - mn, min=1e-6) / 15
        s16 = F16STE.apply(s)
        z = torch.clamp(RoundSTE.apply(-mn / s16), 0, 15)
        q = torch.clamp(RoundSTE.apply(x / s16) + z, 0, 15)
        y = (q - z) * s16
    else:
        s = div_scalar(torch.clamp(mx - mn, min=1e-6), 15, cuda)
        z = mn + s * 8
        q = RoundSTE.apply((x - mn) / s).clamp(0, 15)
        y = (q - 8) * s + z
    return y.view(n, k).to(w.dtype)


def codes_scales_zeros(w, g, scheme, awq):
    """Integer codes (0..15), scales and zeros per SPEC, computed independently."""
    n, k = w.shape
    with torch.no_grad():
        if scheme == "fp8_int4":
            wd = fp8_rows(w).view(n, k // g, g)
            wd = torch.nan_to_num(wd, nan=0.0)  # fp16 row-scale underflow: 0/0 -> 0
            sg = torch.clamp(wd.abs().amax(-1) / 8, min=1e-6)
            # wd == 0 -> code 0 (fp16: 0 * inf reciprocal would be NaN)
            p = torch.where(wd == 0, torch.zeros_like(wd), wd * (1.0 / sg).unsqueeze(-1))
            q = torch.clamp(torch.round(p), -8, 7) + 8
            s = sg.to(torch.float16) if awq else sg
            z = torch.full_like(sg, 8, dtype=torch.float32)
        else:
            x = w.to(torch.float32).view(n, k // g, g)
            mx, mn = x.amax(-1), x.amin(-1)
            s = torch.clamp(mx - mn, min=1e-6) / 15
            if awq:
                s = s.to(torch.float16)
                z = torch.clamp(torch.round(-mn / s.float()), 0, 15)
                q = torch.clamp(torch.round(x / s.float().unsqueeze(-1)) + z.unsqueeze(-1), 0, 15)
            else:
                z = mn + s * 8
                q = torch.clamp(torch.round((x - mn.unsqueeze(-1)) / s.unsqueeze(-1)), 0, 15)
    return q.reshape(n, k).to(torch.uint8), s, z
