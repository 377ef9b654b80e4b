"""Export of a (fake-)quantized model as an AWQ "GEMM" int4 checkpoint.

`export_awq(model, out_dir)` writes safetensors shards (through the C writer
in `_C.st_*`), `model.safetensors.index.json` when sharded, and config.json
with an AWQ `quantization_config` (SPEC section 5).  Layers are quantized,
packed and written one at a time, so memory stays at about one layer beyond
the model itself; everything goes to a temporary directory that is renamed
to `out_dir` only when complete, so a failure leaves nothing under out_dir.

Which Linear becomes what:
  * FakeQuantLinear: its own scheme / mode / group size (what training used);
  * nn.Linear whose weight is a torchao Int4Tensor: its codes, scale and
    float zero point (converted like int4_asym / torchao);
  * plain nn.Linear: round-to-nearest with the keyword arguments;
  * lm_head / output embeddings and `modules_to_not_convert` (substring
    match): fp16 `.weight` (for a FakeQuantLinear: its fake-quant weight).

Exactness (SPEC section 4): int4_asym and fp8_int4 in mode "awq", and fp8_int4
in mode "torchao" with fp16/bf16 weights, write the very codes, integer zeros
and fp16 scales of the fake quant: dequantizing the file reproduces the
fake-quant weight bit for bit (checked per layer).  int4_asym in mode
"torchao" has a float zero point that AWQ cannot store: per group the
integer zero and fp16 scale minimizing the squared error to the fake-quant
weight are chosen (codes re-rounded); the per-layer SQNR (dB) against the
fake-quant weight is reported and `strict=True` refuses anything below
`sqnr_threshold`.
"""
from __future__ import annotations

import errno as _errno
import json
import logging
import math
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _C
from .ops import (
    GROUP_SIZES,
    MODES,
    SCHEMES,
    _check_choice,
    _check_group_size,
    _quantize_int4,
    fake_quant_fp8_int4,
    fake_quant_int4_asym,
    pack_awq,
)

__all__ = [
    "FakeQuantLinear",
    "export_awq",
    "ExportReport",
    "LayerReport",
    "AWQ_GROUP_SIZES",
    "parse_size",
]

log = logging.getLogger(__name__)

AWQ_GROUP_SIZES = (32, 64, 128)
DEFAULT_SQNR_THRESHOLD = 30.0
_EXACT = {("fp8_int4", "awq"), ("int4_asym", "awq"), ("fp8_int4", "torchao")}
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _n, _s in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
               ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _n):
        _ST_DTYPES[getattr(torch, _n)] = _s
_CHUNK_ELEMS = 1 << 20  # rows are processed in chunks of about this many weights


# --------------------------------------------------------------------------
# the fake-quantized Linear
# --------------------------------------------------------------------------
class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses the int4 fake-quantized weight.

    scheme: "int4_asym" or "fp8_int4"; mode: "awq" (exactly exportable) or
    "torchao" (bit-identical to torchao's fake quantizer); group_size along
    in_features.  The parameters are those of nn.Linear (weight, bias), so a
    state dict loads into either class.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 scheme: str = "int4_asym", mode: str = "awq", group_size: int = 128,
                 device=None, dtype=None):
        _check_scheme_mode(scheme, mode)
        _check_group_size(group_size, GROUP_SIZES)
        if in_features % group_size:
            raise ValueError(f"in_features ({in_features}) must be a multiple of group_size "
                             f"({group_size})")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.scheme = scheme
        self.mode = mode
        self.group_size = group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, scheme: str = "int4_asym", mode: str = "awq",
                    group_size: int = 128) -> "FakeQuantLinear":
        """A FakeQuantLinear sharing `linear`'s weight and bias parameters."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme,
                mode=mode, group_size=group_size, device="meta")
        m.weight = linear.weight
        m.bias = linear.bias
        return m

    def fake_quant_weight(self) -> torch.Tensor:
        fn = fake_quant_fp8_int4 if self.scheme == "fp8_int4" else fake_quant_int4_asym
        return fn(self.weight, self.group_size, mode=self.mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", scheme={self.scheme}, mode={self.mode}, "
                f"group_size={self.group_size}")


def _check_scheme_mode(scheme, mode):
    _check_choice("scheme", scheme, SCHEMES)
    _check_choice("mode", mode, MODES)


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
@dataclass
class LayerReport:
    name: str
    source: str  # "fake_quant", "rtn", "int4_tensor" or "converted" (export_qat_awq)
    scheme: str
    mode: str
    group_size: int
    shape: tuple
    exact: bool = False
    sqnr_db: float = float("nan")  # file dequant vs the fake-quant weight


@dataclass
class ExportReport:
    out_dir: str
    files: List[str] = field(default_factory=list)
    total_size: int = 0
    layers: List[LayerReport] = field(default_factory=list)
    modules_to_not_convert: Optional[List[str]] = None
    group_size: int = 0

    @property
    def min_sqnr_db(self) -> float:
        return min((l.sqnr_db for l in self.layers), default=float("inf"))

    @property
    def all_exact(self) -> bool:
        return all(l.exact for l in self.layers)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB" (decimal, as transformers)
    or "2GiB" (binary)."""
    if isinstance(size, bool):
        raise TypeError("max_shard_size must be an int or a string like '5GB'")
    if isinstance(size, int):
        v = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"cannot parse size {size!r} (use e.g. '5GB', '500MB', '2GiB')")
        v = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    else:
        raise TypeError("max_shard_size must be an int or a string like '5GB'")
    if v <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return v


def _st_dtype(dt: torch.dtype, name: str = "") -> str:
    try:
        return _ST_DTYPES[dt]
    except KeyError:
        raise TypeError(f"{name + ': ' if name else ''}dtype {dt} cannot be stored in "
                        "safetensors") from None


def _nbytes(shape, dt) -> int:
    return math.prod(shape) * (torch.finfo(dt).bits if dt.is_floating_point else
                               (8 if dt == torch.bool else torch.iinfo(dt).bits)) // 8


def _all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all() in slices of _CHUNK_ELEMS elements: a whole-
    tensor check would allocate a bool mask as large as the tensor (half a
    GB for a 1 GB fp16 embedding) on top of the export's working set."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _CHUNK_ELEMS]).all())
               for i in range(0, flat.numel(), _CHUNK_ELEMS))


def _to_fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if not t.is_floating_point():
        raise TypeError(f"{name}: dtype {t.dtype} is not a real floating-point type (written as "
                        "float16)")
    out = t.to(device="cpu", dtype=torch.float16).contiguous()
    if not _all_finite(out):
        if not _all_finite(t):
            raise ValueError(f"{name}: contains NaN or Inf (refusing to write a broken "
                             "checkpoint)")
        raise ValueError(f"{name}: values exceed the float16 range (|x| > 65504); "
                         "the AWQ checkpoint stores unquantized tensors in float16")
    return out


def _is_int4_tensor(w) -> bool:
    return (type(w).__name__ == "Int4Tensor" and all(hasattr(w, a) for a in
                                                     ("qdata", "scale", "zero_point",
                                                      "block_size")))


def _sqnr(sig: float, err: float) -> float:
    if err == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return 10.0 * math.log10(sig / err)


def _row_chunks(n: int, k: int):
    step = max(8, (_CHUNK_ELEMS // max(k, 1)) // 8 * 8)
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _dequant_awq(codes, s16, z, g, dtype):
    """D(fp32(q - z) * fp32(s16)) for codes [n,K] u8, s16 [n,G] f16, z [n,G] u8."""
    n, k = codes.shape
    q = codes.to(torch.float32).view(n, -1, g)
    out = (q - z.to(torch.float32).unsqueeze(-1)) * s16.to(torch.float32).unsqueeze(-1)
    return out.view(n, k).to(dtype)


def _compare(codes, s16, z, g, target):
    """(exact, sqnr_db) of the AWQ dequantization against `target` [N,K]:
    a cheap bitwise pass first; the SQNR (float32 terms, float64 sums) only
    when something differs."""
    n, k = target.shape
    exact = True
    for r0, r1 in _row_chunks(n, k):
        if not torch.equal(_dequant_awq(codes[r0:r1], s16[r0:r1], z[r0:r1], g, target.dtype),
                           target[r0:r1]):
            exact = False
            break
    if exact:
        return True, float("inf")
    sig = err = 0.0
    for r0, r1 in _row_chunks(n, k):
        rec = _dequant_awq(codes[r0:r1], s16[r0:r1], z[r0:r1], g, target.dtype).float()
        t = target[r0:r1].float()
        sig += float((t * t).sum(dtype=torch.float64))
        rec -= t
        err += float((rec * rec).sum(dtype=torch.float64))
    return False, _sqnr(sig, err)


def _fit_integer_zero(target: torch.Tensor, g: int, s_init: torch.Tensor, mn: torch.Tensor):
    """Best AWQ representation (codes, fp16 scale, integer zero in [0,15])
    of a weight on a float-zero grid (torchao int4_asym): per group, try the
    integer zeros around -mn/s and, for each, the fp16 scale and its least-
    squares refinement, re-rounding the codes; keep the smallest squared error
    to `target`.  target [N,K] (fake-quant weight), s_init, mn [N,G] fp32."""
    n, k = target.shape
    G = k // g
    codes = torch.empty((n, k), dtype=torch.uint8)
    s_out = torch.empty((n, G), dtype=torch.float16)
    z_out = torch.empty((n, G), dtype=torch.uint8)
    for r0, r1 in _row_chunks(n, k):
        t = target[r0:r1].to(torch.float32).view(r1 - r0, G, g)
        s16 = s_init[r0:r1].to(torch.float16)
        if not bool(torch.isfinite(s16).all()):
            raise ValueError("a group scale overflows float16 (weights too large for AWQ)")
        s16 = torch.where(s16 > 0, s16, torch.full_like(s16, 2.0 ** -24)).to(torch.float32)
        zc = torch.floor(-mn[r0:r1] / s16)
        best_err = torch.full(s16.shape, float("inf"))
        best_s = s16.clone()
        best_z = torch.zeros_like(s16)
        best_q = None
        for dz in (-1.0, 0.0, 1.0, 2.0):
            z = (zc + dz).clamp(0, 15)
            zz = z.unsqueeze(-1)
            s = s16
            for it in range(3):
                ss = s.unsqueeze(-1)
                q = torch.clamp(torch.round(t / ss) + zz, 0, 15)
                e = (((q - zz) * ss - t) ** 2).sum(-1)
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best_s = torch.where(better, s, best_s)
                best_z = torch.where(better, z, best_z)
                bq = better.unsqueeze(-1)
                best_q = q if best_q is None else torch.where(bq, q, best_q)
                if it == 2:
                    break
                # least-squares scale for these codes, rounded to fp16
                d = q - zz
                num = (d * t).sum(-1)
                den = (d * d).sum(-1)
                s_ls = torch.where(den > 0, num / den.clamp_min(1e-30), s)
                s_ls = s_ls.to(torch.float16).to(torch.float32)
                s = torch.where(torch.isfinite(s_ls) & (s_ls > 0), s_ls, s)
        codes[r0:r1] = best_q.view(r1 - r0, k).to(torch.uint8)
        s_out[r0:r1] = best_s.to(torch.float16)
        z_out[r0:r1] = best_z.to(torch.uint8)
    return codes, s_out, z_out


def _int4_tensor_parts(w):
    """(codes u8 [N,K] = signed code + 8, scale fp32 [N,G], zero fp32 [N,G],
    group_size, dequantized weight [N,K]) of a torchao Int4Tensor (plain
    format: qdata int8 [N, K/2], low nibble = even column)."""
    qd = w.qdata.detach().to("cpu")
    if qd.dim() != 2:
        raise ValueError("only 2-D torchao Int4Tensor weights can be exported")
    n = qd.shape[0]
    b = qd.view(torch.uint8)
    lo = (b & 0xF).to(torch.int16)
    hi = ((b >> 4) & 0xF).to(torch.int16)
    nib = torch.stack((lo, hi), dim=-1).view(n, -1)
    signed = torch.where(nib >= 8, nib - 16, nib)
    k = nib.shape[1]
    g = int(w.block_size[-1])
    if tuple(w.shape) != (n, k):
        raise ValueError(f"Int4Tensor shape {tuple(w.shape)} does not match its qdata")
    scale = w.scale.detach().to("cpu").t().contiguous()  # [N, G] in the weight dtype
    zero = w.zero_point.detach().to("cpu").t().contiguous()
    sf = scale.to(torch.float32)
    zf = zero.to(torch.float32)
    deq = (signed.to(torch.float32).view(n, -1, g) * sf.unsqueeze(-1) + zf.unsqueeze(-1))
    deq = deq.view(n, k).to(scale.dtype)
    return (signed + 8).to(torch.uint8), sf, zf, g, deq


# --------------------------------------------------------------------------
# the plan: items (one tensor, or the 3-4 tensors of a quantized Linear)
# --------------------------------------------------------------------------
@dataclass
class _Item:
    entries: list  # [(name, st dtype, shape, nbytes)]
    produce: object  # () -> list of CPU tensors matching entries
    nbytes: int = 0


_FUSED_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_FUSED_NAMES = {_FUSED_SETS[0]: "qkv_proj", _FUSED_SETS[1]: "gate_up_proj"}
# Linear layers that are MoE routers (Mixtral / Qwen-MoE / OLMoE `gate`,
# Qwen-MoE `shared_expert_gate`, `router`) when they are plain nn.Linear
_ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
# the parts of a multimodal model around its text decoder: vision and audio
# towers (transformers' own names for them, get_encoder(modality=...), and
# those its models use beside), projectors and connectors into the text
# model, an omni model's speech generator.  AutoAWQ quantizes the decoder's
# blocks only (its Qwen2/2.5-VL checkpoints list "visual" as not converted),
# and real towers often have shapes AWQ cannot hold (Qwen2.5-VL's vision MLP,
# 3420 wide): plain Linears under these names stay fp16 (a layer trained with
# fake quant there exports as trained)
_MM_NAMES = frozenset((
    "vision_tower", "visual", "vision_model", "vision_encoder", "image_tower", "video_tower",
    "high_res_vision_model", "vision_embed_tokens", "embed_vision", "image_embed",
    "audio_tower", "audio_encoder", "speech_encoder", "embed_audio", "audio_embed",
    "acoustic_tokenizer_encoder", "semantic_tokenizer_encoder",
    "multi_modal_projector", "mm_projector", "projector", "connector", "aligner",
    "generation_aligner", "generation_head", "vision_projection", "vision_adapter",
    "language_projection", "image_to_text_projection", "qformer", "resampler_model", "merger",
    "talker", "token2wav"))


def _mm_part(name: str) -> Optional[str]:
    """The multimodal part (`model.visual`) a module name lies in, else None."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in _MM_NAMES:
            return ".".join(parts[: i + 1])
    return None


def _patterns(modules_to_not_convert):
    if modules_to_not_convert is None:
        return []
    if isinstance(modules_to_not_convert, str):
        modules_to_not_convert = [modules_to_not_convert]
    try:
        items = list(modules_to_not_convert)
    except TypeError:
        raise TypeError("modules_to_not_convert must be a string or a list of strings, got "
                        f"{type(modules_to_not_convert).__name__}") from None
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise TypeError("modules_to_not_convert must hold strings (substrings of module "
                        f"names), got {bad[0]!r}")
    patterns = [p.strip() for p in items]
    if any(not p for p in patterns):
        raise ValueError("modules_to_not_convert: empty pattern (it would match every layer)")
    return patterns


def _converted_names(model: nn.Module) -> List[str]:
    """Names of the modules holding AWQ tensors (a `qweight` of their own)."""
    return [k[: -len("qweight")].rstrip(".") for k in model.state_dict(keep_vars=True)
            if k.rpartition(".")[2] == "qweight"]


# a name inside a numbered block: (container, index, name relative to the block)
_IN_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def _fused_of(name: str):
    """(the name vLLM gives the fused layer `name` is a member of, its
    members), e.g. `a.q_proj` -> (`a.qkv_proj`, (q, k, v)); (None, None)."""
    pre, _, last = name.rpartition(".")
    for members in _FUSED_SETS:
        if last in members:
            return (f"{pre}.{_FUSED_NAMES[members]}" if pre else _FUSED_NAMES[members]), members
    return None, None


def _experts_of(name: str):
    """The MoE `<...>.experts` (vLLM's FusedMoE) `name` lies under, or None."""
    if name.startswith("experts."):
        return "experts"
    i = name.find(".experts.")
    return name[: i + len(".experts")] if i >= 0 else None


def _fused_aliases(quantized: List[str]) -> List[str]:
    """The names vLLM and SGLang give the layers they fuse from quantized ones
    (`<parent>.qkv_proj`, `<parent>.gate_up_proj`, a MoE's `<...>.experts`):
    older vLLM and SGLang match modules_to_not_convert against those."""
    out = set()
    for q in quantized:
        out.update(a for a in (_fused_of(q)[0], _experts_of(q)) if a)
        pre, _, last = q.rpartition(".")
        for members, fname in _FUSED_NAMES.items():
            if last == fname:  # a real fused module (Phi-3): vLLM may expand it to shards
                out.update(f"{pre}.{m}" if pre else m for m in members)
    return sorted(out - set(quantized))


def _add_fused_names(out: List[str], fused: List[str]) -> None:
    """Appends to the skip list `out` the fused name of every fused set whose
    members it lists all (`<parent>.qkv_proj` for q/k/v, `gate_up_proj`) and
    of every MoE `<...>.experts` whose listed experts are all of it (no name
    in `fused`, the quantized layers and their fused names, lies under it):
    SGLang and older vLLM look those up by substring, and no member's name is
    in them.  An alias inside a name of `fused` is left out."""
    have: Dict[str, set] = {}
    for n in out:
        alias, members = _fused_of(n)
        if alias:
            have.setdefault(alias, set()).add(n.rpartition(".")[2])
            if have[alias] == set(members):
                have[alias] = None  # complete
    for alias in [a for a, h in have.items() if h is None] + [_experts_of(n) for n in out]:
        if alias and alias not in out and not any(alias in q for q in fused):
            out.append(alias)


def _config_skips(fp16_linears: List[str], quantized: List[str]) -> List[str]:
    """modules_to_not_convert as config.json records it: every Linear left in
    fp16 by its full name (SPEC 5), which vLLM and transformers match (by
    substring / suffix), then for AutoAWQ, which matches names relative to a
    decoder block (`mlp.down_proj`) and so never a full name, the relative
    names of those in numbered blocks that no quantized layer's name contains
    (every block keeps them in fp16): they add nothing for the others, and
    AutoAWQ skips the same layers.  Layers in blocks that hold quantized
    layers (AutoAWQ's decoder blocks) without such a name are warned about."""
    rels, partial = [], []
    fused = quantized + _fused_aliases(quantized)
    for name in fp16_linears:
        m = _IN_BLOCK.match(name)
        if m is None:
            continue
        rel = m.group(3)
        if not any(rel in q for q in fused):
            if rel not in rels:
                rels.append(rel)
        elif any(re.match(re.escape(m.group(1)) + r"\.\d+\.", q) for q in quantized):
            partial.append(name)
    if partial:
        log.warning("modules_to_not_convert: %s (%d layers) stay float16 but their name "
                    "within the block is not one that only float16 layers have (another block "
                    "quantizes it, or a quantized layer's name contains it); vLLM and "
                    "transformers skip them by their full names, but AutoAWQ matches names "
                    "within a block and cannot load such a checkpoint", partial[0],
                    len(partial))
    out = list(fp16_linears) + [r for r in rels if r not in fp16_linears]
    _add_fused_names(out, fused)  # full and relative alike
    return out


def _vllm_shape_warning(shapes: Dict[str, tuple]):
    """vLLM runs AWQ layers with Marlin (N % 64 == 0 and K % 128 == 0) or
    else its awq_gemm kernel (N % 64 == 0 and N % group size == 0); with K %
    group size == 0 and a group size of 32, 64 or 128 one of them fits
    exactly when N % 64 == 0 (for one GPU; tensor parallelism splits N or K
    further), N of the fused layer for q/k/v and gate/up.  transformers and
    GPTQModel load any N % 8 == 0."""
    fused: Dict[str, int] = {}
    for n, (N, K) in shapes.items():
        alias = _fused_of(n)[0]
        if alias:
            fused[alias] = fused.get(alias, 0) + N
    bad = [(n, fused.get(_fused_of(n)[0], N), K) for n, (N, K) in shapes.items()
           if fused.get(_fused_of(n)[0], N) % 64]
    if bad:
        n, N, K = bad[0]
        log.warning("%d quantized layers (e.g. %s, N=%d%s, K=%d) have out_features not a "
                    "multiple of 64, which none of vLLM's AWQ kernels (Marlin, awq_gemm) runs "
                    "as they stand: vLLM may refuse this checkpoint; transformers and GPTQModel "
                    "load it", len(bad), n or "<model>", N,
                    " fused" if _fused_of(n)[0] else "", K)


def _check_linear_tensors(name: str, mod: nn.Linear):
    """The weight and bias a quantized Linear's tensors are computed from must
    be what its in_features / out_features say."""
    pfx = f"{name}." if name else ""
    n_out, k_in = mod.out_features, mod.in_features
    if n_out <= 0 or k_in <= 0:
        raise ValueError(f"{name or '<model>'}: an empty Linear (out_features={n_out}, "
                         f"in_features={k_in}) cannot be quantized; add it to "
                         "modules_to_not_convert")
    w, b = mod.weight, mod.bias
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{pfx}weight: {type(w).__name__}, not a tensor")
    if tuple(w.shape) != (n_out, k_in):
        raise ValueError(f"{pfx}weight: shape {tuple(w.shape)} does not match the Linear's "
                         f"[out_features, in_features] = [{n_out}, {k_in}]")
    if not w.is_floating_point():
        raise TypeError(f"{pfx}weight: dtype {w.dtype} is not a real floating-point type")
    if b is not None:
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{pfx}bias: {type(b).__name__}, not a tensor")
        if tuple(b.shape) != (n_out,):
            raise ValueError(f"{pfx}bias: shape {tuple(b.shape)} does not match the Linear's "
                             f"[out_features] = [{n_out}]")
        if not b.is_floating_point():
            raise TypeError(f"{pfx}bias: dtype {b.dtype} is not a real floating-point type")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model a wrapper holds: torch.compile's OptimizedModule
    (`_orig_mod`), nn.DataParallel and DistributedDataParallel (`module`),
    however nested.  Their state_dict keys carry the wrapper's prefix
    (`_orig_mod.`, `module.`), which no consumer expects: a checkpoint
    written under them loads into a fresh model as random weights."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    # no import of torch._dynamo (over a second): a model it never loaded
    # cannot be an OptimizedModule
    OptimizedModule = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    while True:
        if isinstance(model, OptimizedModule) and isinstance(getattr(model, "_orig_mod", None),
                                                             nn.Module):
            model = model._orig_mod
        elif isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        else:
            return model


def _is_hf_model(model: nn.Module) -> bool:
    """Whether `model` is a transformers PreTrainedModel (without importing
    transformers where nothing has)."""
    tf = sys.modules.get("transformers")
    cls = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    return isinstance(cls, type) and isinstance(model, cls)


def _check_parametrizations(model: nn.Module):
    """Reparametrized weights (torch.nn.utils.parametrize: weight_norm,
    spectral_norm, pruning masks) are stored as `parametrizations.<name>.
    original*` and computed at each forward: neither a quantized layer nor a
    consumer can use them as they are."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    for name, mod in model.named_modules():
        for hook in mod._forward_pre_hooks.values():
            # the hook-based forms: weight computed from weight_orig * weight_mask
            # (prune), weight_g, weight_v (the old weight_norm) or weight_orig, u, v
            # (the old spectral_norm) at each forward
            if isinstance(hook, (prune.BasePruningMethod, WeightNorm, SpectralNorm)):
                tname = getattr(hook, "_tensor_name", None) or getattr(hook, "name", "weight")
                what, fix = (("pruned (torch.nn.utils.prune)", "torch.nn.utils.prune.remove")
                             if isinstance(hook, prune.BasePruningMethod) else
                             ("weight-normed (torch.nn.utils.weight_norm)",
                              "torch.nn.utils.remove_weight_norm")
                             if isinstance(hook, WeightNorm) else
                             ("spectral-normed (torch.nn.utils.spectral_norm)",
                              "torch.nn.utils.remove_spectral_norm"))
                raise ValueError(f"{name or '<model>'}: {tname} is {what}: the state dict "
                                 f"holds its parts, not {tname}; make it a plain tensor "
                                 f"first with {fix}(module, {tname!r})")
        if parametrize.is_parametrized(mod):
            which = ", ".join(sorted(mod.parametrizations.keys()))
            raise ValueError(f"{name or '<model>'}: {which} is reparametrized "
                             "(torch.nn.utils.parametrize: weight_norm, spectral_norm, pruning, "
                             "...); make it a plain tensor first with "
                             f"torch.nn.utils.parametrize.remove_parametrizations(module, "
                             f"{sorted(mod.parametrizations.keys())[0]!r})")


def _check_adapters(model: nn.Module):
    """PEFT adapter layers (LoRA, DoRA, IA3, ...) wrap the Linear as
    `base_layer` beside their adapter weights: exported as they are, the
    layer would be written under `<name>.base_layer` (a name no consumer
    reads) and the adapter dropped."""
    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        if isinstance(base, nn.Module) and (type(mod).__module__.startswith("peft.")
                                            or hasattr(mod, "lora_A")):
            raise ValueError(f"{name or '<model>'}: a PEFT adapter layer "
                             f"({type(mod).__name__} over {type(base).__name__}); merge the "
                             "adapters into the weights first (model = "
                             "model.merge_and_unload()), then export")


def _is_head(name, mod, out_emb):
    return name == "lm_head" or name.endswith(".lm_head") or (out_emb is not None and
                                                             mod is out_emb)


def _is_router(name):
    # MoE routers stay fp16 (SPEC 5; vLLM builds them unquantized)
    return name.rpartition(".")[2] in _ROUTER_NAMES


def _own_group_size(model: nn.Module, modules_to_not_convert) -> Optional[int]:
    """The group size the model's own quantized layers use (FakeQuantLinear
    layers, torchao Int4Tensor weights, converted AWQ layers) where they
    agree on one, else None: export_awq's default for its plain Linears."""
    patterns = _patterns(modules_to_not_convert)
    out_emb = _output_embedding(model)
    sizes = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or _is_head(name, mod, out_emb) or _is_router(name) \
                or any(p in name for p in patterns):
            continue
        if isinstance(mod, FakeQuantLinear):
            sizes.add(mod.group_size)
        elif _is_int4_tensor(mod.weight):
            sizes.add(int(mod.weight.block_size[-1]))
    sd = model.state_dict()
    for key, qw in sd.items():
        sc = sd.get(key[: -len("qweight")] + "scales") if key.endswith("qweight") else None
        if isinstance(sc, torch.Tensor) and sc.dim() == 2 and sc.shape[0] and qw.dim() == 2:
            sizes.add(qw.shape[0] // sc.shape[0])
    return sizes.pop() if len(sizes) == 1 else None


def _classify(model: nn.Module, modules_to_not_convert, scheme, mode, group_size):
    """Returns (quant: {module name: spec dict}, fp16_linears: [names])."""
    patterns = _patterns(modules_to_not_convert)
    out_emb = _output_embedding(model)
    quant, fp16_linears = {}, []
    used = set()
    mm_parts: Dict[str, list] = {}
    # every name of a module registered under several names (state_dict holds them all)
    for name, mod in model.named_modules(remove_duplicate=False):
        if type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers"):
            if not any(p in name for p in patterns):
                raise ValueError(f"{name}: transformers Conv1D layers (GPT-2 style, weight "
                                 "[in, out]) are not supported by the AWQ export; add them to "
                                 "modules_to_not_convert to keep them in float16")
            continue
        if not isinstance(mod, nn.Linear):
            continue
        if name in quant or name in fp16_linears:
            continue
        is_head = _is_head(name, mod, out_emb)
        hits = [p for p in patterns if p in name]
        used.update(hits)
        # (a plain Linear: not fake-quantized, not a torchao Int4Tensor)
        mm = _mm_part(name) if type(mod) is nn.Linear and not _is_int4_tensor(mod.weight) \
            else None
        if is_head or _is_router(name) or hits or mm:
            if not is_head:
                fp16_linears.append(name)
            if mm and not hits and not _is_router(name):
                mm_parts.setdefault(mm, []).append(name)
            continue
        w = mod.weight
        _check_linear_tensors(name, mod)
        if isinstance(mod, FakeQuantLinear) and not getattr(mod, "weight_fake_quant_enabled", True):
            # its forward uses the float weight: round to nearest, compared with that weight
            log.warning("%s: weight fake quant is disabled (weight_fake_quant_enabled=False), so "
                        "the model computes with its float weight; it is exported by round to "
                        "nearest (%s/%s), not exactly", name or "<model>", mod.scheme, mod.mode)
            spec = dict(source="rtn", scheme=mod.scheme, mode=mod.mode,
                        group_size=mod.group_size, float_forward=True)
        elif isinstance(mod, FakeQuantLinear):
            spec = dict(source="fake_quant", scheme=mod.scheme, mode=mod.mode,
                        group_size=mod.group_size)
        elif _is_int4_tensor(w):
            if getattr(w, "act_pre_scale", None) is not None:
                raise ValueError(f"{name}: Int4Tensor with act_pre_scale (AWQ-smoothed) cannot "
                                 "be exported without folding the pre-scale")
            spec = dict(source="int4_tensor", scheme="int4_asym", mode="torchao",
                        group_size=int(w.block_size[-1]))
        else:
            spec = dict(source="rtn", scheme=scheme, mode=mode, group_size=group_size)
        n_out, k_in = mod.out_features, mod.in_features
        g = spec["group_size"]
        if g not in AWQ_GROUP_SIZES:
            raise ValueError(f"{name}: group size {g} cannot be exported to AWQ (consumers "
                             f"accept {AWQ_GROUP_SIZES}); add it to modules_to_not_convert or "
                             "quantize with another group size")
        if k_in % g:
            raise ValueError(f"{name}: in_features K={k_in} is not a multiple of the group "
                             f"size {g}; add it to modules_to_not_convert")
        if n_out % 8:
            raise ValueError(f"{name}: out_features N={n_out} is not a multiple of 8 (AWQ packs "
                             "8 output channels per int32); add it to modules_to_not_convert")
        if w.device.type == "meta":
            raise ValueError(f"{name}: weight is on the meta device (not materialized)")
        spec.update(module=mod, N=n_out, K=k_in)
        quant[name] = spec
    # layers already in AWQ form (a converted AWQInt4Linear's qweight / qzeros /
    # scales, written as they are) are quantized members of the checks below
    quantized = list(quant) + [c for c in _converted_names(model) if c not in quant]
    # consumers (vLLM, AutoAWQ) match modules_to_not_convert by substring
    for skip in fp16_linears:
        for q in quantized:
            if skip in q:
                raise ValueError(f"module {skip!r} is left in float16 but its name is a "
                                 f"substring of the quantized module {q!r}: AWQ consumers would "
                                 "skip both; rename it or quantize both")
    # vLLM fuses q/k/v and gate/up into one layer: all of a fused set or none
    for members in _FUSED_SETS:
        parents = {}
        for q in quantized:
            pre, _, last = q.rpartition(".")
            if last in members:
                parents.setdefault(pre, [set(), set()])[0].add(last)
        for f in fp16_linears:
            pre, _, last = f.rpartition(".")
            if last in members:
                parents.setdefault(pre, [set(), set()])[1].add(last)
        for pre, (qs, fs) in parents.items():
            if qs and fs:
                raise ValueError(f"{pre}: {sorted(fs)} would stay float16 while {sorted(qs)} "
                                 f"are quantized, but vLLM loads {'/'.join(members)} as one "
                                 "fused layer: keep all of them or none in modules_to_not_convert")
    # vLLM and SGLang load a MoE layer's experts as one FusedMoE: all or none in fp16
    experts: Dict[str, List[set]] = {}
    for i, names_ in enumerate((quantized, fp16_linears)):
        for n in names_:
            if _experts_of(n):
                experts.setdefault(_experts_of(n), [set(), set()])[i].add(n)
    for pre, (qs, fs) in experts.items():
        if qs and fs:
            raise ValueError(f"{pre}: {len(fs)} expert layers (e.g. {sorted(fs)[0]}) would stay "
                             f"float16 while {len(qs)} are quantized, but vLLM loads a MoE "
                             "layer's experts as one fused layer: keep all of them or none in "
                             "modules_to_not_convert")
    # (a pattern may name a Conv1D or a 3-D expert weight, which it accepts in fp16)
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    unused = [p for p in patterns if p not in used and not any(p in n for n in names)]
    if unused:
        log.warning("modules_to_not_convert: %s match no module or parameter", unused)
    groups = {s["group_size"] for s in quant.values()}
    if len(groups) > 1:
        raise ValueError(f"an AWQ checkpoint has one group size, but the quantized layers use "
                         f"{sorted(groups)}")
    if mm_parts:
        log.info("kept in float16 (the Linears around the text decoder, as AutoAWQ keeps them; "
                 "train a layer with fake quant to have it quantized): %s",
                 ", ".join(f"{p or '<model>'} ({len(v)})" for p, v in mm_parts.items()))
    return quant, fp16_linears


def _quant_item(name, spec, report: ExportReport, strict, threshold, verify):
    N, K, g = spec["N"], spec["K"], spec["group_size"]
    mod = spec["module"]
    G = K // g
    has_bias = mod.bias is not None
    pfx = f"{name}." if name else ""  # the model itself may be the Linear
    entries = [(f"{pfx}qweight", "I32", [K, N // 8], K * N // 2),
               (f"{pfx}qzeros", "I32", [G, N // 8], G * N // 2),
               (f"{pfx}scales", "F16", [G, N], G * N * 2)]
    if has_bias:
        entries.append((f"{pfx}bias", "F16", [N], N * 2))

    def produce():
        try:
            return _produce()
        except (ValueError, TypeError) as e:
            label = name or "<model>"
            if str(e).startswith((f"{label}:", f"{label}.")):
                raise
            raise type(e)(f"{label}: {e}") from e

    def _produce():
        scheme, mode, src = spec["scheme"], spec["mode"], spec["source"]
        rep = LayerReport(name=name, source=src, scheme=scheme, mode=mode, group_size=g,
                          shape=(N, K))
        with torch.no_grad():
            if src == "int4_tensor":
                codes, sf, zf, g2, target = _int4_tensor_parts(mod.weight)
                if not (bool(torch.isfinite(sf).all()) and bool(torch.isfinite(zf).all())):
                    raise ValueError(f"{pfx}weight: the Int4Tensor's scale or zero_point "
                                     "contains NaN or Inf (refusing to write a broken checkpoint)")
                if bool((zf == 0).all()):  # symmetric (fp8 activation variant): z = 8
                    s16 = sf.to(torch.float16)
                    if not bool(torch.isfinite(s16).all()):
                        raise ValueError(f"{pfx}weight: an Int4Tensor group scale overflows "
                                         "float16 (the AWQ scale; |scale| > 65504)")
                    z = torch.full_like(codes[:, :G], 8)
                else:
                    mn = zf - 8.0 * sf
                    codes, s16, z = _fit_integer_zero(target, g, sf, mn)
            else:
                w = mod.weight.detach()
                if (scheme, mode) in _EXACT:
                    codes, scales, z = _quantize_int4(w, g, scheme, mode, f"{pfx}weight")
                    s16 = scales.to(torch.float16)
                    if not bool(torch.isfinite(s16).all()):
                        raise ValueError(f"{pfx}weight: a group scale overflows float16 (the "
                                         "AWQ scale; |scale| > 65504)")
                    target = None
                    # fp8_int4/torchao keeps s_g in the weight dtype: exact iff it is an fp16
                    # value; if not, the SQNR is always measured
                    if verify or not torch.equal(s16.to(scales.dtype), scales):
                        fq = fake_quant_fp8_int4 if scheme == "fp8_int4" else fake_quant_int4_asym
                        target = fq(w, g, mode=mode)
                else:  # int4_asym / torchao: float zero point -> best integer zero
                    _, scales, zf = _quantize_int4(w, g, scheme, mode, f"{pfx}weight")
                    target = fake_quant_int4_asym(w, g, mode="torchao")
                    sf = scales.to(torch.float32)
                    mn = zf.to(torch.float32) - 8.0 * sf
                    codes, s16, z = _fit_integer_zero(target.to("cpu"), g, sf.to("cpu"),
                                                      mn.to("cpu"))
            codes, s16, z = codes.to("cpu"), s16.to("cpu"), z.to("cpu")
            if spec.get("float_forward"):  # what the model computes with: its float weight
                target = mod.weight.detach()
            if target is not None:
                rep.exact, rep.sqnr_db = _compare(codes, s16, z, g, target.to("cpu"))
            else:
                rep.exact, rep.sqnr_db = True, float("inf")
            if (scheme, mode) in _EXACT and src != "int4_tensor" and not rep.exact and \
                    not (scheme == "fp8_int4" and mode == "torchao") and not spec.get("float_forward"):
                raise RuntimeError(f"{name}: internal error: the {scheme}/{mode} export is not "
                                   "bit-exact")
            if strict and not rep.sqnr_db >= threshold:  # NaN fails too
                why = ("its weight fake quant is disabled: rounded to nearest, compared with "
                       "the float weight it computes with" if spec.get("float_forward") else
                       "a torchao Int4Tensor's float zero point" if src == "int4_tensor" else
                       f"{scheme}/{mode} cannot be exported exactly")
                raise ValueError(f"{name}: SQNR {rep.sqnr_db:.2f} dB of the AWQ weights against "
                                 "the weights the model computes with is below "
                                 f"sqnr_threshold={threshold} dB ({why})")
            report.layers.append(rep)
            out = [pack_awq(codes), pack_awq(z), s16.t().contiguous()]
            if has_bias:
                out.append(_to_fp16(f"{pfx}bias", mod.bias))
        return out

    return _Item(entries=entries, produce=produce, nbytes=sum(e[3] for e in entries))


def _check_storable(name, t):
    """A state-dict entry safetensors can hold: a dense tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: the state dict holds a {type(t).__name__} here (e.g. a "
                        "module's get_extra_state()), not a tensor: safetensors stores tensors "
                        "only")
    if t.is_nested or t.layout != torch.strided:
        raise ValueError(f"{name}: a {'nested' if t.is_nested else str(t.layout)} tensor; "
                         "safetensors stores dense (strided) tensors only")


def _plain_item(name, t: torch.Tensor):
    _check_storable(name, t)
    if t.is_floating_point():
        dt = torch.float16
    else:
        dt = t.dtype
    st = _st_dtype(dt, name)
    shape = list(t.shape)
    nb = _nbytes(shape, dt)

    def produce():
        if t.is_floating_point():
            return [_to_fp16(name, t).contiguous()]
        return [t.detach().to("cpu").contiguous()]

    return _Item(entries=[(name, st, shape, nb)], produce=produce, nbytes=nb)


def _storage_key(t: torch.Tensor):
    if t.numel() == 0:  # every empty storage has data_ptr 0: never treat them as tied
        return ("empty", id(t))
    try:
        return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(),
                tuple(t.shape), tuple(t.stride()), t.dtype)
    except Exception:  # noqa: BLE001  (tensor subclasses without storage)
        return ("id", id(t))


# Model types whose AWQ checkpoints carry `<mlp>.<act>.scales` (AutoAWQ's
# ScaledActivation; transformers' AWQ_SCALES_MAPPINGS wraps the activation and
# leaves it uninitialised, NaN logits, when the tensor is missing): ones.
_SCALED_ACT = {
    "starcoder2": ("act", "c_fc"), "RefinedWebModel": ("act", "dense_h_to_4h"),
    "falcon": ("act", "dense_h_to_4h"), "mpt": ("act", "up_proj"), "gptj": ("act", "fc_in"),
    "gpt_neox": ("act", "dense_h_to_4h"), "gpt_bigcode": ("act", "c_fc"),
    "bloom": ("gelu_impl", "dense_h_to_4h"),
}


def _scaled_act_items(model, model_type, have):
    if model_type not in _SCALED_ACT:
        return []
    act, before = _SCALED_ACT[model_type]
    items = []
    for name, mod in model.named_modules():
        lin = getattr(mod, before, None)
        if act in mod._modules and isinstance(lin, nn.Module) and hasattr(lin, "out_features"):
            key = f"{name}.{act}.scales" if name else f"{act}.scales"
            if key not in have:
                items.append(_plain_item(key, torch.ones(lin.out_features)))
    return items


def _plan(model, quant, report, strict, threshold, verify, tie_ok, model_type=None, tied=None):
    """The items to write, in state-dict order.  tied: receives the keys left
    out because they share storage with another one (an earlier one, or an
    embedding's weight, which is the one kept)."""
    sd = model.state_dict(keep_vars=True)
    owner = {}
    for qn in quant:
        owner[f"{qn}.weight" if qn else "weight"] = qn
        owner[f"{qn}.bias" if qn else "bias"] = qn
    missing = [qn or "<model>" for qn in quant if (f"{qn}.weight" if qn else "weight") not in sd]
    if missing:
        # a Linear whose weight is not in state_dict under its own name
        # (weight_norm's weight_g / weight_v, a hook-computed weight)
        raise ValueError(f"{', '.join(missing[:5])}: the Linear's weight is not in the model's "
                         "state_dict as <name>.weight (reparametrized, e.g. by "
                         "torch.nn.utils.weight_norm?); make it a plain parameter first")
    # of tied tensors the embedding's key is the one written (SPEC 5: write
    # embed_tokens.weight once), whichever comes first in state_dict
    emb_keys = {f"{n}.weight" if n else "weight" for n, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, nn.Embedding)}
    items, done, seen, pos = [], set(), {}, {}
    for key, t in sd.items():
        if key in owner:
            qn = owner[key]
            if qn not in done:
                done.add(qn)
                items.append(_quant_item(qn, quant[qn], report, strict, threshold, verify))
            continue
        if t is None:
            continue
        _check_storable(key, t)  # before _storage_key / the meta check look at it
        if _is_int4_tensor(t):
            # an excluded Linear (lm_head / modules_to_not_convert) holding an Int4Tensor
            t = _int4_tensor_parts(t)[4]
        elif t.device.type == "meta":
            raise ValueError(f"{key}: tensor is on the meta device (not materialized)")
        sk = _storage_key(t)
        if sk in seen and tie_ok:
            kept = seen[sk]
            if key in emb_keys and kept not in emb_keys:
                # the embedding replaces the twin written so far (lm_head first)
                log.info("%s is tied to %s: written once", kept, key)
                items[pos[sk]] = _plain_item(key, t)
                seen[sk] = key
                if tied is not None:
                    tied.append(kept)
                continue
            log.info("%s is tied to %s: written once", key, kept)
            if tied is not None:
                tied.append(key)
            continue
        seen[sk], pos[sk] = key, len(items)
        items.append(_plain_item(key, t))
    return items + _scaled_act_items(model, model_type, sd)


def _output_embedding(model):
    """model.get_output_embeddings() as a module, or None."""
    try:
        oe = model.get_output_embeddings()
    except Exception:  # noqa: BLE001  (models without one raise various errors)
        return None
    return oe if isinstance(oe, nn.Module) else None


def _output_embedding_names(model) -> set:
    """The module names of the model's output embedding (get_output_embeddings)."""
    oe = _output_embedding(model)
    return set() if oe is None else {n for n, m in model.named_modules(remove_duplicate=False)
                                     if m is oe}


# nested configs whose model reads its own tie_word_embeddings (vLLM builds a
# VLM's language model from text_config)
_NESTED_CONFIGS = ("text_config", "llm_config", "language_config")


def _head_differs(model) -> bool:
    """Whether what the export writes for the output embedding (lm_head: its
    weight, an excluded FakeQuantLinear's fake-quant weight, an Int4Tensor's
    dequantized values) differs from the input embedding's weight, in fp16:
    then the two cannot be tied in the checkpoint."""
    try:
        ie, oe = model.get_input_embeddings(), model.get_output_embeddings()
    except Exception:  # noqa: BLE001  (models without them raise various errors)
        return False
    wi, wo = getattr(ie, "weight", None), getattr(oe, "weight", None)
    if not isinstance(wi, torch.Tensor) or not isinstance(wo, torch.Tensor) or \
            _is_int4_tensor(wi) or "meta" in (wi.device.type, wo.device.type):
        return False
    with torch.no_grad():
        if isinstance(oe, FakeQuantLinear) and getattr(oe, "weight_fake_quant_enabled", True):
            head = oe.fake_quant_weight()
        elif _is_int4_tensor(wo):
            head = _int4_tensor_parts(wo)[4]
        elif type(wo) not in (torch.Tensor, nn.Parameter) or \
                _storage_key(wi) == _storage_key(wo):
            return False
        else:
            head = wo
        if tuple(wi.shape) != tuple(head.shape):
            return True
        return not torch.equal(wi.to(torch.float16), head.to(wi.device, torch.float16))


def _check_converted_group_size(model, G, from_layers):
    """Tensors already in AWQ form (a converted AWQInt4Linear: `qweight`
    [K, N/8], `qzeros` [K/g, N/8], `scales` [K/g, N]) are written as they
    are: their group size must be the one config.json records."""
    sd = model.state_dict()
    for key, qw in sd.items():
        if not key.endswith("qweight"):
            continue
        base = key[: -len("qweight")]
        qz, sc = sd.get(base + "qzeros"), sd.get(base + "scales")
        label = base.rstrip(".") or "<model>"
        if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (qw, qz, sc)):
            raise ValueError(f"{label}: qweight without 2-D qzeros and scales beside it is not "
                             "an AWQ GEMM layer")
        k, groups = qw.shape[0], sc.shape[0]
        if groups == 0 or k % groups or qz.shape[0] != groups or qz.shape[1] != qw.shape[1] \
                or sc.shape[1] != 8 * qw.shape[1]:
            raise ValueError(f"{label}: inconsistent AWQ tensors: qweight {tuple(qw.shape)}, "
                             f"qzeros {tuple(qz.shape)}, scales {tuple(sc.shape)}")
        g = k // groups
        if g != G:
            other = ("the other quantized layers use" if from_layers else
                     "group_size (the value config.json records) is")
            raise ValueError(f"{label}: converted layer with group size {g} (qweight {k} rows, "
                             f"scales {groups} rows), but {other} {G}: "
                             + ("convert all layers with one group size" if from_layers else
                                f"pass group_size={g} (export_qat_awq does)"))


def _prefix_renames(sd, reverted):
    """{module path: its name in checkpoints} from a state dict and its
    renamed copy (the same tensor objects under new keys), or None when the
    renames are not those of module paths."""
    new_of = {id(t): k for k, t in reverted.items()}
    if len(new_of) != len(reverted) or len(reverted) != len(sd):
        return None
    renames = {}
    for old, t in sd.items():
        new = new_of.get(id(t))
        if new is None:
            return None
        o, n = old.split("."), new.split(".")
        j = 0  # the leaf's name is kept: the parts both end with
        while j < min(len(o), len(n)) and o[len(o) - 1 - j] == n[len(n) - 1 - j]:
            j += 1
        if j == 0:
            return None
        for i in range(1, j + 1):
            op, np_ = ".".join(o[: len(o) - i]), ".".join(n[: len(n) - i])
            if not op and not np_:
                break
            if renames.setdefault(op, np_) != np_:
                return None
    return renames if any(a != b for a, b in renames.items()) else None


def _checkpoint_name(renames, key: str) -> str:
    """key under the checkpoint name of its longest renamed module prefix."""
    if not renames:
        return key
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        new = renames.get(".".join(parts[:i]))
        if new is not None:
            return ".".join([new] + parts[i:]) if new else ".".join(parts[i:])
    return key


def _check_checkpoint_names(model):
    """transformers >= 5 fuses some weights at load time (MoE experts become
    3-D `experts.gate_up_proj`, ...) and splits them again when saving.  The
    module tree then differs from the checkpoint layout AWQ consumers read,
    and those experts would be left unquantized: refuse such models.  Where
    only names differ, returns {module path: checkpoint name} (else None)."""
    if not (type(model).__module__.startswith("transformers.")
            or hasattr(model, "_weight_conversions")):
        return None
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    sd = dict(model.state_dict())
    try:
        reverted = revert_weight_conversion(model, dict(sd))
    except Exception:  # noqa: BLE001  (a model transformers cannot map: nothing to compare)
        return None
    changed = sorted(set(sd) - set(reverted))
    if not changed:
        return None
    saved = sorted(set(reverted) - set(sd))
    shapes = lambda d, ks: sorted(tuple(d[k].shape) for k in ks)  # noqa: E731
    if len(changed) == len(saved) and shapes(sd, changed) == shapes(reverted, saved):
        # names only (e.g. GPT-NeoX embed_out, VLM prefixes): write what save_pretrained
        # writes (vLLM's GPT-NeoX has no lm_head; transformers loads either name)
        renames = _prefix_renames(sd, reverted)
        if renames is None:
            log.warning("transformers names %d tensors differently in checkpoints (e.g. %s -> "
                        "%s); the export keeps the module names, which transformers loads",
                        len(changed), changed[0], saved[0])
        return renames
    raise ValueError(
        f"{changed[0]}: transformers stores this model's weights in the checkpoint "
        f"under other names and shapes (e.g. {saved[:2]}; fused MoE experts), which "
        f"the AWQ export does not handle yet ({len(changed)} tensors affected)")


def _check_fused_weights(model, patterns):
    """Weights of 3+ dims in expert modules are fused expert stacks (e.g.
    gpt-oss `experts.gate_up_proj` [E, K, N]): the export would write them
    in fp16, unquantized; refuse unless modules_to_not_convert names them.
    Other 3+-dim weights outside convolutions (e.g. RecurrentGemma's block-
    diagonal gates) are written in fp16 with a warning."""
    convs = (nn.modules.conv._ConvNd,)
    accepted = []
    for mname, mod in model.named_modules():
        if isinstance(mod, convs):
            continue
        expert = re.search(r"expert|moe", type(mod).__name__, re.IGNORECASE) is not None
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if p.dim() < 3 or not p.is_floating_point():
                continue
            if any(q in full for q in patterns):
                if expert and mname not in accepted:
                    accepted.append(mname)
                continue
            if not expert:
                log.warning("%s: %d-D weight %s written in fp16, unquantized", full, p.dim(),
                            tuple(p.shape))
                continue
            raise ValueError(
                f"{full}: a {p.dim()}-D weight {tuple(p.shape)} of {type(mod).__name__} (fused "
                "MoE experts) cannot be written as AWQ Linear layers; it would stay "
                "unquantized in fp16. Add it to modules_to_not_convert to accept that")
    return accepted


def _fake_quant_fp16(name: str, mod: FakeQuantLinear):
    """[the fp16 weight an excluded FakeQuantLinear computed with]."""
    with torch.no_grad():
        w = mod.fake_quant_weight()
    try:
        return [_to_fp16(name, w)]
    except ValueError:  # word it: the weight itself may be finite
        if not _all_finite(w) and _all_finite(mod.weight.detach()):
            raise ValueError(f"{name}: the fake-quant weight of this {type(mod).__name__} (kept "
                             "in float16) is not finite although the weight is: a group "
                             f"scale overflows ({mod.scheme}/{mod.mode}; |w| too large)") from None
        raise


def _shard(items: List[_Item], limit: int) -> List[List[_Item]]:
    shards, cur, size = [], [], 0
    for it in items:
        if cur and size + it.nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it.nbytes
    if cur:
        shards.append(cur)
    return shards


# the tokenizer's and processor's files save_pretrained writes beside config.json:
# vLLM reads the tokenizer from the model directory unless told otherwise, and
# GPTQModel.load always does.  The vocabulary files are every name a
# tokenizer of transformers 5.23 declares (VOCAB_FILES_NAMES), so that one
# with files of its own (GPT-NeoX-Japanese's emoji.json) still loads
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "sentencepiece.model", "spm.model", "spm_char.model",
    "source.spm", "target.spm", "bpe.codes", "dict.txt", "emoji.json", "entity_vocab.json",
    "normalizer.json", "byte_maps.json", "target_vocab.json", "vocab-src.json",
    "vocab-tgt.json", "word_pronunciation.json", "word_shape.json", "prophetnet.tokenizer",
    "qwen.tiktoken", "tiktoken.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
# save_pretrained writes a tokenizer's named chat templates (a dict's keys
# other than "default": "tool_use", "rag", ...) as <name>.jinja there; without
# them apply_chat_template(tools=...) silently uses the default template
_CHAT_TEMPLATES_DIR = "additional_chat_templates"
# files the export writes itself (never taken from a tokenizer's declared names)
_WRITTEN_HERE = ("config.json", "generation_config.json")
# the vocabulary file names a remote-code tokenizer declares in its source
_VOCAB_NAMES_RE = re.compile(r"(?:VOCAB_FILES_NAMES|vocab_files_names)\s*=\s*\{([^}]*)\}")


def _tokenizer_files(hf_config) -> List[tuple]:
    """The tokenizer / processor files (and remote-code .py files) of an
    hf_config directory, to be copied: (source path, name in the export)."""
    if not isinstance(hf_config, (str, os.PathLike)) or not os.path.isdir(hf_config):
        return []
    d = os.fspath(hf_config)
    names = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(d, f))]
    # a remote-code model's or tokenizer's own classes (config.json's and
    # tokenizer_config.json's auto_map name them), as save_pretrained copies them
    code = sorted(f for f in os.listdir(d) if f.endswith(".py") and
                  f.startswith(("tokenization_", "configuration_", "modeling_", "processing_",
                                "image_processing_", "video_processing_", "feature_extraction_"))
                  and os.path.isfile(os.path.join(d, f)))
    # and the modules those import relatively (`from .helper import ...`), as
    # transformers' dynamic module loader needs them beside; and the
    # vocabulary files their tokenizers declare (ChatGLM's ice_text.model)
    todo = list(code)
    while todo:
        with open(os.path.join(d, todo.pop()), encoding="utf-8", errors="replace") as f:
            src = f.read()
        for mod in re.findall(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+))", src,
                              flags=re.MULTILINE):
            dep = f"{mod[0] or mod[1]}.py"
            if dep not in code and os.path.isfile(os.path.join(d, dep)):
                code.append(dep)
                todo.append(dep)
        for block in _VOCAB_NAMES_RE.findall(src):
            for v in re.findall(r"""["']([^"']+)["']\s*(?:,|$)""", block):
                v = os.path.normpath(v)  # ("./ice_text.model")
                if os.sep not in v and v not in names and v not in _WRITTEN_HERE and \
                        not v.startswith((".", "model.", "pytorch_model")) and \
                        not v.endswith((".py", ".safetensors", ".index.json")) and \
                        os.path.isfile(os.path.join(d, v)):
                    names.append(v)
    out = [(os.path.join(d, f), f) for f in names + code]
    tdir = os.path.join(d, _CHAT_TEMPLATES_DIR)
    if os.path.isdir(tdir):
        out += [(os.path.join(tdir, f), f"{_CHAT_TEMPLATES_DIR}/{f}")
                for f in sorted(os.listdir(tdir))
                if f.endswith(".jinja") and os.path.isfile(os.path.join(tdir, f))]
    return out


def _config_dict(model, hf_config):
    """(config dict or None, generation_config.json bytes or None)."""
    cfg, gen = _config_dict_from(model, hf_config)
    if gen is None and getattr(model, "generation_config", None) is not None:
        # what save_pretrained writes: eos lists and sampling defaults live there
        try:
            gen = model.generation_config.to_json_string(use_diff=True).encode()
        except Exception as e:  # noqa: BLE001
            log.warning("generation_config of the model not written: %s", e)
    return cfg, gen


def _config_dict_from(model, hf_config):
    gen = None
    cfg = hf_config
    if cfg is None:
        cfg = getattr(model, "config", None)
    if cfg is None:
        return None, None
    if isinstance(cfg, (str, os.PathLike)):
        p = os.fspath(cfg)
        if os.path.isdir(p):
            gp = os.path.join(p, "generation_config.json")
            if os.path.isfile(gp):
                with open(gp, "rb") as f:
                    gen = f.read()
            p = os.path.join(p, "config.json")
        try:
            with open(p, "r", encoding="utf-8") as f:
                d = json.load(f, parse_constant=_no_json_constant)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{p}: not a valid JSON config ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a config.json must hold a JSON object, got "
                             f"{type(d).__name__}")
        return d, gen
    if isinstance(cfg, dict):
        return _json_roundtrip(cfg, None), gen
    if hasattr(cfg, "to_dict"):
        return _json_roundtrip(cfg.to_dict(), str), gen
    raise TypeError("hf_config must be a directory, a config.json path, a dict, a transformers "
                    f"PretrainedConfig or None, got {type(cfg).__name__}")


def _no_json_constant(c):
    raise ValueError(f"{c} is not valid JSON")


def _json_roundtrip(d, default):
    try:
        return json.loads(json.dumps(d, default=default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise type(e)(f"hf_config: {e} (config.json must be valid JSON: no tensors, NaN or "
                      "Infinity)") from None


def _write_json(path, obj):
    data = (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode()
    _write_bytes(path, data)


def _write_bytes(path, data: bytes):
    """data as the new file path; an error names the file (config.json,
    the index, a tokenizer file), as the shards' errors do."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:  # (a PermissionError stays one)
        raise type(e)(e.errno, f"writing {os.path.basename(path)}: {e.strerror}",
                      path) from None


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_out_dir(out_dir) -> str:
    """Absolute out_dir; raises FileExistsError unless it is absent or an
    empty directory."""
    if not isinstance(out_dir, (str, bytes, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = os.path.abspath(os.fsdecode(os.fspath(out_dir)))
    if os.path.lexists(out_dir):
        if os.path.islink(out_dir):
            raise FileExistsError(_errno.EEXIST, "out_dir is a symbolic link (the export "
                                  "renames a new directory into place, it does not follow "
                                  "links)", out_dir)
        if not os.path.isdir(out_dir):
            raise FileExistsError(_errno.EEXIST, "out_dir exists and is not a directory",
                                  out_dir)
        if os.listdir(out_dir):
            raise FileExistsError(_errno.EEXIST, "out_dir exists and is not empty (refusing to "
                                  "overwrite)", out_dir)
    return out_dir


def _prepare_out_dir(out_dir: str):
    """(out_dir, temporary directory, parent directories created here,
    deepest first: removed again if the export fails, inside).  The
    temporary directory is made beside out_dir and renamed into place at the
    end; where that rename cannot work, because out_dir is an existing
    (empty) mount point or on another file system than its parent, or the
    parent is not writable, it is made inside out_dir (`inside`) and its
    files are moved up one by one (_move_into)."""
    out_dir = check_out_dir(out_dir)
    parent = os.path.dirname(out_dir)
    exists = os.path.isdir(out_dir)
    if exists and (os.path.ismount(out_dir) or os.stat(out_dir).st_dev != os.stat(parent).st_dev):
        return out_dir, _make_tmp(out_dir, ".tmp-", "out_dir", out_dir, []), [], True
    created = []
    p = parent
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        created.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        _remove_empty_dirs(created)
        raise type(e)(e.errno, f"cannot create the parent directory of out_dir: {e.strerror}",
                      parent) from None
    base = os.path.basename(out_dir)
    try:
        return (out_dir, _make_tmp(parent, f".{base[:100]}.tmp-", "the parent directory of out_dir",
                                   parent, created), created, False)
    except PermissionError:
        if not exists:
            raise
    # an empty out_dir in a parent we may not write in
    return out_dir, _make_tmp(out_dir, ".tmp-", "out_dir", out_dir, []), [], True


def _make_tmp(where, prefix, what, label, created):
    for _ in range(100):
        tmp = os.path.join(where, f"{prefix}{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:  # (a PermissionError stays one)
            _remove_empty_dirs(created)
            raise type(e)(e.errno, f"cannot write in {what}: {e.strerror}", label) from None
    _remove_empty_dirs(created)
    raise FileExistsError(_errno.EEXIST, "cannot create a temporary directory", label)


def _move_into(tmp, out_dir, files):
    """The finished files from tmp (inside out_dir) moved up into out_dir,
    config.json last (a loader looks for it first), a sub-directory
    (additional_chat_templates/) whole; if a move fails, those already moved
    are removed again, so out_dir is left empty."""
    tops = list(dict.fromkeys(f.split("/", 1)[0] for f in files))
    order = [f for f in tops if f != "config.json"] + [f for f in tops if f == "config.json"]
    moved = []
    try:
        for f in order:
            dst = os.path.join(out_dir, f)
            if os.path.lexists(dst):  # something else wrote there meanwhile
                raise FileExistsError(_errno.EEXIST, "out_dir is no longer empty", dst)
            os.rename(os.path.join(tmp, f), dst)
            moved.append(dst)
        os.rmdir(tmp)
    except OSError as e:
        for dst in moved:
            try:
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(dst)
                else:
                    os.unlink(dst)
            except OSError:
                pass
        raise type(e)(e.errno, f"cannot move the finished export into place: {e.strerror}",
                      e.filename or out_dir) from None
    _fsync_dir(out_dir)


def _remove_empty_dirs(dirs):
    for d in dirs:  # deepest first; stops at the first one something else has filled
        try:
            os.rmdir(d)
        except OSError:
            return


# test hook: called with each open writer handle (fault injection)
_writer_hook = None


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
def export_awq(model: nn.Module, out_dir, *, scheme: str = "int4_asym", mode: str = "awq",
               group_size: Optional[int] = None, max_shard_size="5GB",
               modules_to_not_convert: Optional[Sequence[str]] = None, hf_config=None,
               strict: bool = False, sqnr_threshold: float = DEFAULT_SQNR_THRESHOLD,
               verify: bool = True, progress: bool = True,
               act_scales: bool = True) -> ExportReport:
    """Write `model` as an AWQ GEMM int4 checkpoint in the new directory
    `out_dir` (which must not exist or be empty).

    scheme / mode / group_size: how plain nn.Linear layers are quantized
    (round to nearest); FakeQuantLinear layers keep their own settings.
    group_size defaults to the one the model's own quantized layers
    (FakeQuantLinear, Int4Tensor, converted AWQ layers) use, else 128.
    modules_to_not_convert: substrings of Linear names left in float16
    (lm_head always is).  hf_config: a directory (config.json and, if present,
    generation_config.json are used), a config.json path, a dict or a
    PretrainedConfig; default `model.config`.  strict: raise if a layer's SQNR
    against the weight the model computes with is below sqnr_threshold dB
    (inexact layers: int4_asym/torchao, fp8_int4/torchao whose scales are not
    fp16 values, torchao Int4Tensor weights with a float zero point, layers
    whose weight fake quant is disabled).  verify: check each
    exact layer bit for bit (costs a fake-quant pass).  act_scales: for the
    model types whose AutoAWQ checkpoints carry ScaledActivation scales
    (`<mlp>.<act>.scales`: bloom, falcon, gpt_neox, gptj, gpt_bigcode, mpt,
    starcoder2), write them (ones): transformers needs them, and current
    vLLM has no parameter for them and refuses the checkpoint; False for vLLM.
    Returns an ExportReport (files, per-layer exactness and SQNR).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if sys.byteorder != "little":
        raise RuntimeError("export_awq writes tensors' bytes as they are in memory, and "
                           "safetensors files are little-endian: this host is big-endian")
    model = unwrap_model(model)
    _check_scheme_mode(scheme, mode)
    if group_size is not None:
        _check_group_size(group_size, AWQ_GROUP_SIZES, " for an AWQ checkpoint")
    limit = parse_size(max_shard_size)
    if not isinstance(sqnr_threshold, (int, float)) or math.isnan(sqnr_threshold):
        raise ValueError(f"sqnr_threshold must be a number of dB, got {sqnr_threshold!r}")
    check_out_dir(out_dir)
    modules_to_not_convert = _patterns(modules_to_not_convert)
    if group_size is None:
        own = _own_group_size(model, modules_to_not_convert)
        # (one AWQ cannot hold, 256: that layer's own error names it)
        group_size = own if own in AWQ_GROUP_SIZES else 128
    _check_parametrizations(model)
    _check_adapters(model)
    quant, fp16_linears = _classify(model, modules_to_not_convert, scheme, mode, group_size)
    if not quant and not any(k.rpartition(".")[2] == "qweight" for k in model.state_dict()):
        raise ValueError("the model has no Linear layer to quantize (none outside lm_head and "
                         "modules_to_not_convert): an AWQ checkpoint needs at least one")
    renames = _check_checkpoint_names(model)
    fp16_stacks = _check_fused_weights(model, _patterns(modules_to_not_convert))
    cfg, gen = _config_dict(model, hf_config)
    tok_files = _tokenizer_files(hf_config)
    if not tok_files:
        log.warning("no tokenizer files written (%s): vLLM and GPTQModel.load read the "
                    "tokenizer from the checkpoint directory; save it there "
                    "(tokenizer.save_pretrained(out_dir)) or pass hf_config (CLI: --hf-config) "
                    "= a directory with them",
                    f"none in {hf_config}" if isinstance(hf_config, (str, os.PathLike))
                    and os.path.isdir(hf_config) else "no hf_config directory")
    head_differs = not (cfg is not None and cfg.get("tie_word_embeddings") is False) and \
        _head_differs(model)
    tie_ok = not (cfg is not None and cfg.get("tie_word_embeddings") is False) and \
        not head_differs
    G = next(iter(quant.values()))["group_size"] if quant else group_size
    _check_converted_group_size(model, G, bool(quant))
    shapes = {n: (s["N"], s["K"]) for n, s in quant.items()}
    sd_all = model.state_dict(keep_vars=True)
    for c in _converted_names(model):
        qw = sd_all[f"{c}.qweight" if c else "qweight"]
        shapes.setdefault(c, (8 * qw.shape[1], qw.shape[0]))
    del sd_all
    _vllm_shape_warning(shapes)
    # (fused expert stacks kept in fp16: their modules, which vLLM builds as a FusedMoE)
    skips = _config_skips(fp16_linears + fp16_stacks, list(shapes)) \
        if fp16_linears or fp16_stacks else None
    if skips and renames:
        # the tensors go under save_pretrained's names: list the fp16 layers under
        # those too (a matcher reading the file's names), where that is safe
        def ck(n):
            return _checkpoint_name(renames, f"{n}.weight")[: -len(".weight")]
        taken = list(shapes) + [ck(q) for q in shapes]
        taken += _fused_aliases(taken)
        added = []
        for n in fp16_linears:
            c = ck(n)
            if n and c != n and c not in skips and not any(c in q for q in taken):
                added.append(c)
        _add_fused_names(added, taken)
        skips += [c for c in added if c not in skips]
    if skips:
        # a multimodal part (a vision tower) all in fp16: its bare name too (`visual`,
        # `vision_tower`), which vLLM matches by substring whatever its model's renames
        # make of the full names, and which matches no quantized layer
        taken = list(shapes) + _fused_aliases(list(shapes))
        if renames:
            taken += [_checkpoint_name(renames, f"{q}.weight")[: -len(".weight")]
                      for q in shapes]
        for n in fp16_linears:
            b = (_mm_part(n) or "").rpartition(".")[2]
            if b and b not in skips and not any(b in q for q in taken):
                skips.append(b)

    out_dir, tmp, created, inside = _prepare_out_dir(out_dir)
    report = ExportReport(out_dir=out_dir, group_size=G,
                          modules_to_not_convert=fp16_linears or None)
    handle = None
    try:
        tied: List[str] = []
        model_type = (cfg or {}).get("model_type")
        items = _plan(model, quant, report, strict, sqnr_threshold, verify, tie_ok,
                      model_type if act_scales else None, tied)
        n_act = sum(it.entries[0][0].endswith(f"{_SCALED_ACT[model_type][0]}.scales")
                    for it in items) if act_scales and model_type in _SCALED_ACT else 0
        if n_act:
            log.warning("%s: %d ScaledActivation scales (<mlp>.<act>.scales, ones) written, "
                        "as AutoAWQ does and transformers needs (NaN logits without); vLLM "
                        "(since late 2024) has no parameter for them and refuses the checkpoint: "
                        "export with act_scales=False (CLI --no-act-scales) for vLLM",
                        model_type, n_act)
        fq_keys = {}
        if renames:
            for it in items:
                fq_keys[_checkpoint_name(renames, it.entries[0][0])] = it.entries[0][0]
                it.entries = [(_checkpoint_name(renames, e[0]),) + tuple(e[1:])
                              for e in it.entries]
        for it in items:
            for e in it.entries:
                try:
                    e[0].encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{e[0]!r}: a tensor name must be valid UTF-8 "
                                     "(safetensors headers are UTF-8 JSON)") from None
        # an excluded FakeQuantLinear keeps the weight it trained with
        fq_excluded = {f"{n}.weight": m for n, m in model.named_modules()
                       if isinstance(m, FakeQuantLinear) and n not in quant
                       and getattr(m, "weight_fake_quant_enabled", True)}
        for it in items:
            nm = fq_keys.get(it.entries[0][0], it.entries[0][0])
            if len(it.entries) == 1 and nm in fq_excluded:
                m = fq_excluded[nm]
                it.produce = (lambda m=m, nm=nm: _fake_quant_fp16(nm, m))
        shards = _shard(items, limit)
        nsh = len(shards)
        names = (["model.safetensors"] if nsh == 1 else
                 [f"model-{i + 1:05d}-of-{nsh:05d}.safetensors" for i in range(nsh)])
        weight_map: Dict[str, str] = {}
        total = sum(it.nbytes for it in items)

        def is_layer(it):  # an AWQ layer's tensors (qweight, qzeros, scales[, bias])
            return it.entries[0][0].rpartition(".")[2] == "qweight"

        n_layers, layers_done = sum(map(is_layer, items)), 0
        try:
            from tqdm import tqdm
            # over bytes, with the quantized layers written so far beside
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="AWQ export",
                       disable=not progress, postfix=f"layers 0/{n_layers}")
        except ImportError:  # pragma: no cover
            bar = None
        try:
            for fname, shard in zip(names, shards):
                entries = [(e[0], e[1], e[2]) for it in shard for e in it.entries]
                handle = _C.st_open(os.path.join(tmp, fname), entries,
                                    {"format": "pt"})
                if _writer_hook is not None:
                    _writer_hook(handle, fname)
                idx = 0
                for it in shard:
                    tensors = it.produce()
                    for e, t in zip(it.entries, tensors):
                        if _st_dtype(t.dtype) != e[1] or list(t.shape) != list(e[2]):
                            raise RuntimeError(f"internal error: {e[0]} produced "
                                               f"{t.dtype}{list(t.shape)}, planned {e[1]}{e[2]}")
                        # raw bytes: a lazy negation / conjugation must be applied first
                        t = t.resolve_neg().resolve_conj().contiguous()
                        _C.st_write(handle, idx, t.data_ptr(), t.numel() * t.element_size())
                        weight_map[e[0]] = fname
                        idx += 1
                    del tensors
                    if bar is not None:
                        if is_layer(it):
                            layers_done += 1
                            bar.set_postfix_str(f"layers {layers_done}/{n_layers}",
                                                refresh=False)
                        bar.update(it.nbytes)
                _C.st_close(handle)
                handle = None
                report.files.append(fname)
        finally:
            if bar is not None:
                bar.close()
        report.total_size = total
        if nsh > 1:
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total},
                         "weight_map": dict(sorted(weight_map.items()))})
            report.files.append("model.safetensors.index.json")
        conf = dict(cfg or {})
        if "model_type" not in conf:
            log.warning("config.json gets no model_type (%s): transformers and vLLM cannot "
                        "load the directory without one; pass hf_config (the model's "
                        "config)", "no hf_config, and the model has no .config"
                        if cfg is None else "hf_config has none")
        conf.pop("quantization_config", None)
        conf["torch_dtype"] = "float16"
        if cfg is not None and not conf.get("architectures") and _is_hf_model(model):
            # a model built from its config (from_config, Cls(cfg)) has none;
            # save_pretrained names its class, and vLLM picks the model by it
            conf["architectures"] = [type(model).__name__]
        head_names = _output_embedding_names(model)
        if "tie_word_embeddings" not in conf and any(
                k.rpartition(".")[0].rpartition(".")[2] == "lm_head" or
                k.rpartition(".")[0] in head_names for k in tied):
            # lm_head.weight was left out as the embedding's twin: say so, or a
            # loader whose default is untied (vLLM's Llama) finds it missing
            conf["tie_word_embeddings"] = True
        if head_differs and cfg is not None:
            # both written; say untied wherever a config says tied (or nothing:
            # PretrainedConfig's default is tied)
            subs = [conf] + [conf[k] for k in _NESTED_CONFIGS if isinstance(conf.get(k), dict)]
            if any(c.get("tie_word_embeddings") is True for c in subs):
                log.warning("config.json says tie_word_embeddings, but what the model computes "
                            "with as lm_head differs from its input embedding (untied, fake-"
                            "quantized or int4 in training): written untied (tie_word_embeddings "
                            "false), else consumers would use the input embedding as lm_head")
            for c in subs:
                if c is conf or c.get("tie_word_embeddings") is True:
                    c["tie_word_embeddings"] = False
        if "dtype" in conf:
            conf["dtype"] = "float16"
        conf["quantization_config"] = {
            "quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": skips,
        }
        if fp16_linears:
            # GPTQModel's own loader (GPTQModel.load) ignores
            # modules_to_not_convert: it skips a module only by a negative
            # `dynamic` rule, else it builds an int4 layer for a float weight
            conf["quantization_config"]["dynamic"] = {
                f"-:^{re.escape(n)}$": {} for n in fp16_linears}
        _write_json(os.path.join(tmp, "config.json"), conf)
        report.files.append("config.json")
        if gen is not None:
            _write_bytes(os.path.join(tmp, "generation_config.json"), gen)
            report.files.append("generation_config.json")
        for src, name in tok_files:
            if "/" in name:
                os.makedirs(os.path.join(tmp, os.path.dirname(name)), exist_ok=True)
            with open(src, "rb") as f:
                _write_bytes(os.path.join(tmp, name), f.read())
            report.files.append(name)
        _fsync_dir(tmp)
        if inside:
            _move_into(tmp, out_dir, report.files)
        else:
            try:
                os.rename(tmp, out_dir)
            except OSError as e:
                raise type(e)(e.errno, f"cannot move the finished export into place: "
                              f"{e.strerror}", out_dir) from None
        tmp = None
        _fsync_dir(os.path.dirname(out_dir))
    except BaseException:
        if handle is not None:
            _C.st_abort(handle)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty_dirs(created)
        raise
    inexact = [l for l in report.layers if not l.exact]
    if inexact:
        worst = min(inexact, key=lambda l: l.sqnr_db)
        log.warning("AWQ export: %d of %d layers are not exact (lowest SQNR %.2f dB at %s)",
                    len(inexact), len(report.layers), worst.sqnr_db, worst.name)
    return report


def _stored_tensors(d: str) -> Dict[str, tuple]:
    """{tensor name: (dtype, shape, fetch)} of the tensors in a save_pretrained
    directory's weight files (safetensors headers; a pytorch_model.bin is
    memory-mapped), fetch() reading the tensor as stored.  The files are
    those transformers reads, in its order: model.safetensors, its index,
    pytorch_model.bin, its index (a directory saved into twice keeps stale ones)."""
    from safetensors import safe_open

    def files(index, single):
        if os.path.isfile(os.path.join(d, single)):
            if os.path.isfile(os.path.join(d, index)):
                raise ValueError(f"{d}: holds both {single} and {index} (saved into twice?): "
                                 f"transformers would read {single} and the shards the index "
                                 "names might be newer; remove the stale one")
            return [single]
        idx = os.path.join(d, index)
        if not os.path.isfile(idx):
            return []
        try:
            with open(idx, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{idx}: cannot read its weight_map: {type(e).__name__}: "
                             f"{e}") from e
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"{idx}: its weight_map must map names to file names (strings)")
        return names

    out = {}
    st = files("model.safetensors.index.json", "model.safetensors")
    for fn in st:
        path = os.path.join(d, fn)
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    dt = sl.get_dtype()
                    out[k] = (next((t for t, n in _ST_DTYPES.items() if n == dt), None),
                              tuple(sl.get_shape()), lambda path=path, k=k: _st_get(path, k))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"{path}: cannot read it as safetensors: {type(e).__name__}: "
                             f"{str(e)[:300]}") from e
    if not st:
        for fn in files("pytorch_model.bin.index.json", "pytorch_model.bin"):
            path = os.path.join(d, fn)
            try:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # the legacy (non-zip) format cannot be mapped
                    if "mmap" not in str(e):
                        raise
                    sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001  (whatever a corrupt file makes torch.load raise)
                raise ValueError(f"{path}: cannot read it (torch.load): {type(e).__name__}: "
                                 f"{str(e)[:300]}") from e
            if not isinstance(sd, dict):
                raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
            for k, t in sd.items():
                if isinstance(t, torch.Tensor):
                    out[k] = (t.dtype, tuple(t.shape), lambda t=t: t)
    return out


def _st_get(path, key):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _load_model_dir(d: str, progress: bool = True) -> nn.Module:
    """A transformers model directory (`save_pretrained`, a Trainer checkpoint)
    read by transformers itself, as the class its config.json names, each
    tensor in the dtype it is stored in."""
    cfg_path = os.path.join(d, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{d}: a model directory needs its config.json (save_pretrained "
                         "writes it)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_path}: cannot read it as JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("quantization_config"):
        qm = (cfg["quantization_config"].get("quant_method", "?")
              if isinstance(cfg["quantization_config"], dict) else "?")
        raise ValueError(f"{d}: config.json has a quantization_config (quant_method {qm!r}): the "
                         "directory holds a quantized model; export the float or QAT-trained "
                         "model it came from")
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ImportError("reading a model directory needs transformers "
                          "(pip install transformers)") from e
    stored = _stored_tensors(d)
    floats = {k: dt for k, (dt, _, _) in stored.items() if dt is not None and dt.is_floating_point}
    # load in the dtype of most of the 2-D weights' bytes (one, the usual case);
    # a tensor stored in another dtype (fp32 norms) is put back as stored after
    nbytes = {}
    for k, dt in floats.items():
        if len(stored[k][1]) == 2 or all(len(stored[j][1]) != 2 for j in floats):
            nbytes[dt] = nbytes.get(dt, 0) + math.prod(stored[k][1]) * dt.itemsize
    dtype = max(nbytes, key=nbytes.get) if nbytes else "auto"
    # the class save_pretrained recorded (a vision-language model keeps its
    # vision tower), else the causal LM of the model type
    archs = cfg.get("architectures")
    cls = None
    if isinstance(archs, list) and archs and isinstance(archs[0], str) and \
            archs[0].endswith(("ForCausalLM", "ForConditionalGeneration")):
        try:
            cls = getattr(transformers, archs[0], None)
        except Exception:  # noqa: BLE001  (a class whose optional backend is missing)
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModelForCausalLM
    was = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(d, dtype=dtype, local_files_only=True,
                                          trust_remote_code=False, output_loading_info=True)
    except Exception as e:  # noqa: BLE001  (config validation raises huggingface_hub's errors too)
        msg = str(e).strip()
        if "trust_remote_code" in msg or "custom code" in msg:
            raise ValueError(f"{d}: a remote-code model (config.json's auto_map): the CLI does not "
                             "run code from the directory; load it in Python "
                             "(trust_remote_code=True) and call export_awq, or torch.save the "
                             "model and pass --allow-pickle") from e
        if "ignore_mismatched_sizes" in msg:
            msg = "some tensors' shapes differ from those its config.json gives"
        raise ValueError(f"{d}: transformers cannot load it as {cls.__name__}: "
                         f"{type(e).__name__}: {msg[:500]}") from e
    finally:
        if not progress and was:
            hf_logging.enable_progress_bar()
    bad = {k: sorted(info.get(k) or ())[:10] for k in ("missing_keys", "unexpected_keys",
                                                       "mismatched_keys")}
    errs = info.get("error_msgs") or []
    if any(bad.values()) or errs:
        awq = [k for k in bad["unexpected_keys"] if str(k).endswith((".qweight", ".qzeros"))]
        if awq:
            raise ValueError(f"{d}: the checkpoint holds AWQ tensors (qweight / qzeros: a "
                             f"converted model's, e.g. {awq[0]}), which the float model its "
                             "config.json describes has no place for; export the converted "
                             "model itself (torch.save(model) and --allow-pickle, or "
                             "export_qat_awq in Python)")
        what = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in bad.items() if v)
        raise ValueError(f"{d}: the checkpoint does not match the model its config.json "
                         f"describes ({what or errs[0]}): transformers would leave those "
                         "weights freshly initialised")
    # tensors the class drops on load without a word (an MTP head, a vision
    # tower of a class without one): the export would quietly lose them
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None)
                                       or ())]
    sd = model.state_dict(keep_vars=True)
    dropped = sorted(k for k in stored if k not in sd and any(p.search(k) for p in ignored))
    # and weights the class lets go missing without a word (initialised at random)
    lax = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None)
                                   or ())]
    have = {id(sd[k]) for k in stored if k in sd}
    unset = sorted(k for k, t in sd.items() if k not in stored and id(t) not in have
                   and any(p.search(k) for p in lax))
    if unset:
        raise ValueError(f"{d}: the checkpoint does not hold {unset[:10]}, which "
                         f"{type(model).__name__} then initialises without a word; the export "
                         "would write those values")
    if dropped:
        raise ValueError(f"{d}: {type(model).__name__} does not load {len(dropped)} of its "
                         f"tensors (e.g. {dropped[:3]}), so the export would leave them out; "
                         "remove them from the directory to export without them")
    restore = [k for k, dt in floats.items() if k in sd and sd[k].dtype != dt]
    if restore:  # loaded in another dtype than stored: put back what was stored
        names = {}  # every name of each tensor (a tied head shares the embedding's)
        for n, t in [*model.named_parameters(remove_duplicate=False),
                     *model.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), []).append(n)
        with torch.no_grad():
            for k in restore:
                old, sd[k] = sd[k], None  # (the loaded copy is freed as it is replaced)
                t = stored[k][2]().to(device=old.device).clone()
                if t.shape != old.shape:
                    raise ValueError(f"{d}: {k} is stored with shape {tuple(t.shape)}, the "
                                     f"model holds {tuple(old.shape)}")
                if isinstance(old, nn.Parameter):
                    t = nn.Parameter(t, requires_grad=old.requires_grad)
                for n in names.get(id(old), [k]):
                    modname, _, attr = n.rpartition(".")
                    mod = model.get_submodule(modname)
                    if isinstance(t, nn.Parameter):
                        setattr(mod, attr, t)
                    else:
                        mod._buffers[attr] = t
                del old, t
    return model.eval()


def load_for_export(checkpoint: str, hf_config: Optional[str] = None, *,
                    allow_pickle: bool = False, progress: bool = True) -> nn.Module:
    """Loads a transformers model directory (`save_pretrained`, a Trainer
    checkpoint: read by transformers, each weight in its stored dtype), a
    `torch.save`d model, or a state dict built into the transformers model
    described by `hf_config` (a directory)."""
    if os.path.isdir(checkpoint):
        return _load_model_dir(checkpoint, progress)
    kw = dict(map_location="cpu")
    try:
        obj = torch.load(checkpoint, weights_only=not allow_pickle, mmap=True, **kw)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        obj = torch.load(checkpoint, weights_only=not allow_pickle, **kw)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{checkpoint}: expected a torch.save'd nn.Module or state dict")
    if hf_config is None:
        raise ValueError("a state dict needs --hf-config DIR (the model's config.json) to "
                         "build the model")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ImportError("building a model from a state dict needs transformers "
                          "(pip install transformers)") from e
    if not os.path.isdir(hf_config) and not os.path.isfile(hf_config):
        # (AutoConfig would take it for a Hub model id and try the network)
        raise ValueError(f"hf_config {hf_config!r}: no such directory or config.json")
    config = AutoConfig.from_pretrained(hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(obj, strict=False, assign=True)
    if unexpected:
        if any(k.endswith((".qweight", ".qzeros")) for k in unexpected):
            awq = next(k for k in unexpected if k.endswith((".qweight", ".qzeros")))
            raise ValueError(f"{checkpoint}: the state dict holds AWQ tensors (qweight / "
                             f"qzeros: a converted model's, e.g. {awq}), which the "
                             "plain transformers model built from --hf-config has no place "
                             "for; export the converted model itself (torch.save(model) and "
                             "--allow-pickle, or export_qat_awq in Python)")
        raise ValueError(f"{checkpoint}: keys not in the model: {unexpected[:10]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    meta = [n for n, p in model.state_dict().items() if p.device.type == "meta"]
    if meta:
        raise ValueError(f"{checkpoint}: tensors missing from the state dict: {meta[:10]}")
    return model
