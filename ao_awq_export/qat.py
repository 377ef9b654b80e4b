"""torchao `quantize_` integration: QAT prepare / convert with our ops, and
in-place swaps between torchao's QAT modules and ours.

    from torchao.quantization import quantize_
    from ao_awq_export.qat import AWQQATConfig, awq_filter, export_qat_awq

    cfg = dict(scheme="int4_asym", mode="awq", group_size=64)
    quantize_(model, AWQQATConfig(**cfg, step="prepare"), filter_fn=awq_filter)
    train(model)                                  # fake-quantized weights (our C ops)
    quantize_(model, AWQQATConfig(**cfg, step="convert"), filter_fn=awq_filter)
    export_qat_awq(model, "out_dir")              # AWQ GEMM checkpoint, bit-exact

prepare: each targeted nn.Linear becomes a `QATLinear` (a FakeQuantLinear)
holding the very same weight / bias Parameters, so the state dict keys are
those of the float model and an optimizer built before prepare still works.
For scheme "fp8_int4" the input activations are also fake-quantized per row
to fp8 (`fake_quant_fp8_rows`), as torchao's Float8DynamicActivationInt4Weight
QAT does.

convert: each QATLinear becomes an `AWQInt4Linear`, which holds the int4 codes,
integer zero points and fp16 scales from `quantize_int4`, already in AWQ's GEMM
layout (buffers `qweight` int32 [K, N/8], `qzeros` int32 [K/g, N/8], `scales`
fp16 [K/g, N], plus `bias`): its state dict *is* the AWQ checkpoint's tensors,
so `export_awq` writes them unchanged, and its forward dequantizes them to
exactly the prepared forward's weight (bit for bit).  Only representations an
AWQ file can hold exactly are converted: mode "awq" (both schemes) and
fp8_int4/"torchao" when every scale is an fp16 value (fp16 weights); otherwise
convert raises and tells what to do instead.

torchao interop: `swap_torchao_qat_to_ours(model)` replaces torchao's
FakeQuantizedLinear (from `QATConfig(Int4WeightOnlyConfig(), step="prepare")` or
`QATConfig(Float8DynamicActivationInt4WeightConfig(), step="prepare")`) with
QATLinear in mode "torchao" (same forward numerics, C kernels); and
`swap_ours_to_torchao_qat(model)` goes back.  Both keep the Parameters.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .export import (
    _ROUTER_NAMES,
    FakeQuantLinear,
    LayerReport,
    _mm_part,
    _output_embedding,
    _output_embedding_names,
    _patterns,
    export_awq,
    unwrap_model,
)
from .ops import (
    GROUP_SIZES,
    MODES,
    SCHEMES,
    STES,
    _check_choice,
    _check_group_size,
    fake_quant_fp8_int4,
    fake_quant_fp8_rows,
    fake_quant_int4_asym,
    pack_awq,
    quantize_int4,
)

__all__ = [
    "AWQQATConfig",
    "QATLinear",
    "AWQInt4Linear",
    "awq_filter",
    "export_qat_awq",
    "swap_torchao_qat_to_ours",
    "swap_ours_to_torchao_qat",
    "AWQ_NIBBLE_ORDER",
]

# logical column j of each pack of 8 output channels sits at bits 4*AWQ_NIBBLE_ORDER[j]
AWQ_NIBBLE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
STEPS = ("prepare", "convert")


def _check(scheme, mode, group_size, ste="autograd"):
    _check_choice("scheme", scheme, SCHEMES)
    _check_choice("mode", mode, MODES)
    _check_choice("ste", ste, STES)
    _check_group_size(group_size)


# --------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------
@dataclass
class AWQQATConfig(AOBaseConfig):
    """Config for `torchao.quantization.quantize_`: QAT with ao_awq_export's ops.

    scheme: "int4_asym" (asymmetric [0,15], AWQ's native form) or "fp8_int4"
        (symmetric int4 of the fp8-rounded weight, with fp8 per-row activations).
    mode: "awq" (integer zero, fp16 scale: exported bit-exactly; the default) or
        "torchao" (bit-identical to torchao's Int4WeightFakeQuantizer).
    group_size: 32, 64, 128 (AWQ consumers accept these) or 256.
    step: "prepare" (nn.Linear -> QATLinear) or "convert" (QATLinear ->
        AWQInt4Linear; other modules are left alone, as torchao's QATConfig does).
        At convert the module's own scheme / mode / group size are used.
        prepare leaves a Linear the group size does not divide (and, in mode
        "awq", one with out_features % 8 != 0) as it is, with a warning, like
        torchao's Int4WeightOnlyConfig: it never stops half-way.
    act_fake_quant: fp8 per-row activation fake quant; None = on for fp8_int4.
    ste: "autograd" (torch autograd through torchao's formula) or "pure"
        (straight-through gradient, cheaper).

    As with every torchao config, which modules are touched is `quantize_`'s
    `filter_fn`; its default also takes `lm_head`: pass `filter_fn=awq_filter`
    to leave lm_head in float, as AWQ checkpoints do.
    """

    scheme: str = "int4_asym"
    mode: str = "awq"
    group_size: int = 128
    step: str = "prepare"
    act_fake_quant: Optional[bool] = None
    ste: str = "autograd"

    def __post_init__(self):
        if not isinstance(self.step, str) or self.step.lower() not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, got {self.step!r}")
        self.step = self.step.lower()
        _check(self.scheme, self.mode, self.group_size, self.ste)
        if self.act_fake_quant is not None and not isinstance(self.act_fake_quant, bool):
            raise TypeError("act_fake_quant must be None or a bool")

    @property
    def activations(self) -> bool:
        return (self.scheme == "fp8_int4") if self.act_fake_quant is None else self.act_fake_quant


_HEAD_NAMES = ("lm_head", "embed_out")  # embed_out: GPT-NeoX / Pythia's output projection


# Linear subclasses whose forward is nn.Linear's but for where the bias is added
# (transformers' FalconLinear: input @ weight.T + bias): QATLinear may replace them
_PLAIN_FORWARD = {("transformers.models.falcon.modeling_falcon", "FalconLinear")}


def _own_forward(module: nn.Module) -> bool:
    """A Linear subclass with a forward of its own (a MoE router returning
    (logits, weights, indices), say): QATLinear's plain F.linear forward
    would replace it."""
    t = type(module)
    return (isinstance(module, nn.Linear) and t.forward is not nn.Linear.forward
            and (t.__module__, t.__qualname__) not in _PLAIN_FORWARD
            and not isinstance(module, FakeQuantLinear) and not isinstance(module, _torchao_fql()))


def _visited_name(module: nn.Module) -> str:
    """'<name>: ' for messages about the module quantize_'s handler was
    given, else ''.  quantize_ passes its handler no name, so it is read from
    torchao's traversal that called the handler for this very module (its
    `cur_fqn`, or FqnToConfig's `fqn`); where torchao is not found there
    (another caller, a changed torchao) the messages go without it."""
    f = sys._getframe(2)  # (this function's caller is the handler)
    for _ in range(6):
        if f is None:
            return ""
        loc = f.f_locals
        name = None
        if f.f_code.co_name == "_replace_with_custom_fn_if_matches_filter" and \
                loc.get("model") is module and isinstance(loc.get("cur_fqn"), str):
            name = loc["cur_fqn"][:-1]
        elif f.f_code.co_name == "_fqn_to_config_handler" and loc.get("module") is module \
                and isinstance(loc.get("fqn"), str):
            name = loc["fqn"]
        if name is not None:
            # (a torch.compile'd model's names as the export writes them)
            name = ".".join(p for p in name.split(".") if p != "_orig_mod")
            return f"{name or '<model>'}: "
        f = f.f_back
    return ""


def awq_filter(module: nn.Module, fqn: str = "") -> bool:
    """A `quantize_` filter_fn: every nn.Linear except the output projection
    (`lm_head`, or GPT-NeoX's `embed_out`), MoE routers (`gate`, `router`,
    `shared_expert_gate`) and, in a multimodal model, the Linears around the
    text decoder (vision and audio towers, projectors: `visual`,
    `vision_tower`, `multi_modal_projector`, ...): AWQ checkpoints keep them
    in fp16 (vLLM builds routers unquantized; AutoAWQ quantizes the decoder
    only), and export_awq leaves such plain Linears in fp16 too.  Linear
    subclasses with a forward of their own are left alone too.
    export_qat_awq also refuses a converted `model.get_output_embeddings()`
    under any other name."""
    from torchao.quantization.quant_api import _is_linear

    if not _is_linear(module) or _own_forward(module):
        return False
    last = fqn.rpartition(".")[2]
    return last not in _HEAD_NAMES and last not in _ROUTER_NAMES and _mm_part(fqn) is None


# --------------------------------------------------------------------------
# prepared module
# --------------------------------------------------------------------------
class QATLinear(FakeQuantLinear):
    """nn.Linear with int4 weight fake quant (our C ops) and, optionally, fp8
    per-row activation fake quant.  Parameters are those of nn.Linear (weight,
    bias): the state dict is the float model's.  `weight_fake_quant_enabled` /
    `act_fake_quant` switch the two fake quants (torchao's `enabled`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 scheme: str = "int4_asym", mode: str = "awq", group_size: int = 128,
                 act_fake_quant: Optional[bool] = None, ste: str = "autograd",
                 device=None, dtype=None):
        _check(scheme, mode, group_size, ste)
        super().__init__(in_features, out_features, bias, scheme=scheme, mode=mode,
                         group_size=group_size, device=device, dtype=dtype)
        self.act_fake_quant = (scheme == "fp8_int4") if act_fake_quant is None else \
            bool(act_fake_quant)
        self.ste = ste
        self.weight_fake_quant_enabled = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, scheme: str = "int4_asym", mode: str = "awq",
                    group_size: int = 128, act_fake_quant: Optional[bool] = None,
                    ste: str = "autograd") -> "QATLinear":
        """A QATLinear sharing `linear`'s weight and bias Parameters."""
        _check(scheme, mode, group_size, ste)
        if linear.in_features % group_size:
            raise ValueError(f"in_features ({linear.in_features}) must be a multiple of "
                             f"group_size ({group_size}); leave this Linear out with filter_fn")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme,
                mode=mode, group_size=group_size, act_fake_quant=act_fake_quant, ste=ste,
                device="meta")
        m.weight = linear.weight
        m.bias = linear.bias
        return m

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's Parameters."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def fake_quant_weight(self) -> torch.Tensor:
        fn = fake_quant_fp8_int4 if self.scheme == "fp8_int4" else fake_quant_int4_asym
        return fn(self.weight, self.group_size, mode=self.mode, ste=self.ste)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fake_quant:
            x = fake_quant_fp8_rows(x, ste=self.ste)
        w = self.fake_quant_weight() if self.weight_fake_quant_enabled else self.weight
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_fake_quant={self.act_fake_quant}, ste={self.ste}"


# --------------------------------------------------------------------------
# converted module
# --------------------------------------------------------------------------
def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AWQ's nibble order -> int32 codes [C, R] (transposed back)."""
    r, c8 = packed.shape
    shifts = torch.tensor([4 * o for o in AWQ_NIBBLE_ORDER], dtype=torch.int32,
                          device=packed.device)
    nib = torch.bitwise_and(torch.bitwise_right_shift(packed.unsqueeze(-1), shifts), 15)
    return nib.reshape(r, c8 * 8).t()


class AWQInt4Linear(nn.Module):
    """A converted Linear: int4 codes, integer zeros and fp16 scales in AWQ's
    GEMM layout (buffers `qweight` int32 [K, N/8], `qzeros` int32 [K/g, N/8],
    `scales` fp16 [K/g, N]; `bias` as in the float model).  forward computes
    w = dtype(fp32(q - z) * fp32(s)) (the fake-quant weight, bit for bit) and
    F.linear, with the fp8 activation fake quant first when `act_fake_quant`.
    Not an nn.Linear: export_awq writes its tensors as they are."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 group_size: int = 128, scheme: str = "int4_asym", mode: str = "awq",
                 act_fake_quant: bool = False, dtype: torch.dtype = torch.float32,
                 device=None, ste: str = "autograd"):
        super().__init__()
        _check(scheme, mode, group_size, ste)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got "
                             f"K={in_features}, N={out_features}")
        if in_features % group_size or out_features % 8:
            raise ValueError(f"AWQ needs in_features % group_size == 0 and out_features % 8 == "
                             f"0, got K={in_features}, N={out_features}, g={group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.scheme, self.mode = group_size, scheme, mode
        self.act_fake_quant = bool(act_fake_quant)
        self.ste = ste  # the activation fake quant's gradient (what training used)
        self.weight_dtype = dtype
        G = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(G, out_features // 8, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=torch.float16,
                                                   device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_qat_linear(cls, mod: QATLinear) -> "AWQInt4Linear":
        w = mod.weight.detach()
        scheme, mode, g = mod.scheme, mod.mode, mod.group_size
        if w.device.type == "meta":
            raise ValueError("convert: the weight is on the meta device (not materialized); "
                             "load the weights (load_state_dict(..., assign=True) or to_empty) "
                             "before converting")
        if not mod.weight_fake_quant_enabled:
            raise ValueError(
                "convert: this QATLinear's weight fake quant is disabled "
                "(weight_fake_quant_enabled=False; torchao's weight quantizer was disabled), so "
                "its forward uses the float weight and an int4 module could not equal it; "
                "enable it, or leave this Linear out of convert with filter_fn")
        if mode == "torchao" and scheme == "int4_asym":
            raise ValueError(
                "convert: int4_asym in mode 'torchao' has a float zero point, which an AWQ "
                "checkpoint cannot hold exactly; prepare with mode='awq', or export the "
                "prepared model with export_awq (it fits the closest AWQ weights and reports "
                "the SQNR), or use torchao's own QATConfig(Int4WeightOnlyConfig(), "
                "step='convert') (swap_ours_to_torchao_qat first)")
        if mod.out_features % 8:
            raise ValueError(f"convert: out_features ({mod.out_features}) must be a multiple of "
                             "8 for AWQ packing; leave this Linear out with filter_fn")
        codes, scales, zeros = quantize_int4(w, g, scheme=scheme, mode=mode)
        s16 = scales.to(torch.float16)
        off = s16.to(scales.dtype) != scales  # [N, K/g]: not an fp16 value
        if off.any():
            # a group whose codes all equal its zero point dequantizes to zeros
            # with any scale (an all-zero group: the eps scale 1e-6)
            n_, k_ = codes.shape
            off &= (codes.view(n_, k_ // g, g) != zeros.view(n_, k_ // g, 1)).any(-1)
        if bool(off.any()):
            raise ValueError(
                "convert: fp8_int4 in mode 'torchao' keeps its group scales in the weight dtype "
                f"({w.dtype}), and some are not float16 values, so an AWQ checkpoint cannot hold "
                "them exactly; prepare with mode='awq' (same codes, fp16 scales)")
        out = cls(mod.in_features, mod.out_features, mod.bias is not None, group_size=g,
                  scheme=scheme, mode=mode, act_fake_quant=mod.act_fake_quant, dtype=w.dtype,
                  device="meta", ste=mod.ste)
        out.qweight = pack_awq(codes)
        out.qzeros = pack_awq(zeros.to(torch.uint8))
        out.scales = s16.t().contiguous()
        if mod.bias is not None:
            out.bias = nn.Parameter(mod.bias.detach(), requires_grad=False)
        return out

    def _apply(self, fn, recurse=True):
        # .half() / .bfloat16() / .to(dtype) change the compute dtype; the
        # integer buffers and the exact fp16 scales only move between devices
        keep = {n: getattr(self, n) for n in ("qweight", "qzeros", "scales")}
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=keep["scales"].device))
        super()._apply(fn, recurse)
        for n, t in keep.items():  # .half() / .type(): the buffers keep their dtype and values
            if getattr(self, n).dtype != t.dtype:
                setattr(self, n, t.to(device=getattr(self, n).device))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.weight_dtype = probe.dtype
        return self

    def codes(self) -> torch.Tensor:
        """uint8 [N, K] codes in [0, 15]."""
        return _unpack_awq(self.qweight).to(torch.uint8)

    def zeros(self) -> torch.Tensor:
        """uint8 [N, K/g] integer zero points."""
        return _unpack_awq(self.qzeros).to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        # row-major like the fake-quant output: F.linear's result depends on the layout
        q = _unpack_awq(self.qweight).to(torch.float32,
                                          memory_format=torch.contiguous_format).view(n, k // g, g)
        z = _unpack_awq(self.qzeros).to(torch.float32).unsqueeze(-1)
        s = self.scales.t().to(torch.float32).unsqueeze(-1)
        return ((q - z) * s).view(n, k).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fake_quant:
            x = fake_quant_fp8_rows(x, ste=getattr(self, "ste", "autograd"))
        return F.linear(x, self.dequantize(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}, mode={self.mode}, "
                f"group_size={self.group_size}, act_fake_quant={self.act_fake_quant}, "
                + (f"ste={self.ste}, " if getattr(self, "ste", "autograd") != "autograd" else "")
                + f"dtype={self.weight_dtype}")


# --------------------------------------------------------------------------
# the quantize_ handler
# --------------------------------------------------------------------------
def _torchao_fql():
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return FakeQuantizedLinear


def _prepare_skip_reason(module: nn.Linear, config: AWQQATConfig) -> str:
    """Why prepare leaves this Linear alone ("" if it does not): like torchao's
    Int4WeightOnlyConfig, which skips weights its group size does not divide,
    prepare never fails half-way through a model."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return ("its weight is reparametrized (torch.nn.utils.parametrize: weight_norm, "
                "spectral_norm, pruning, ...), and QATLinear needs the weight Parameter itself")
    w = module.weight
    if not isinstance(w, nn.Parameter):
        return f"its weight is a {type(w).__name__}, not an nn.Parameter"
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return (f"its weight is {w.dtype}; the fake-quant ops take bfloat16, float16 and "
                "float32")
    if module.in_features % config.group_size:
        return (f"in_features is not a multiple of group_size {config.group_size}: the int4 "
                "groups would not tile the rows")
    if config.mode == "awq" and module.out_features % 8:
        return ("out_features is not a multiple of 8: an AWQ checkpoint packs 8 output channels "
                "per int32, so mode 'awq' could never convert or export it")
    return ""


@register_quantize_module_handler(AWQQATConfig)
def _awq_qat_transform(module: nn.Module, config: AWQQATConfig) -> nn.Module:
    name = _visited_name(module)
    if config.step == "prepare":
        if isinstance(module, AWQInt4Linear):
            raise ValueError(f"prepare: {name}the module is already converted (AWQInt4Linear)")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name}AWQQATConfig applies to nn.Linear only, got "
                             f"{type(module).__name__} (AWQ checkpoints keep embeddings and "
                             "other modules in fp16)")
        skip = _prepare_skip_reason(module, config)
        if _own_forward(module):
            skip = (f"{type(module).__name__} has a forward of its own, which QATLinear's "
                    "would replace")
        if skip:
            plain = "reparametrized" in skip or "not an nn.Parameter" in skip
            todo = ("to quantize or export it, make its weight a plain Parameter first "
                    "(torch.nn.utils.parametrize.remove_parametrizations, "
                    "torch.nn.utils.prune.remove): the export refuses it even in "
                    "modules_to_not_convert" if plain else
                    "to export the model, name it in modules_to_not_convert (lm_head stays "
                    "fp16 anyway)")
            warnings.warn(f"AWQQATConfig prepare: {name}{type(module).__name__}(in_features="
                          f"{module.in_features}, out_features={module.out_features}) left as it "
                          f"is ({skip}); {todo}", stacklevel=2)
            return module
        if isinstance(module, QATLinear):
            same = (module.scheme, module.mode, module.group_size, module.act_fake_quant,
                    module.ste) == (config.scheme, config.mode, config.group_size,
                                    config.activations, config.ste)
            if same:
                return module
            module = module.to_linear()
        elif isinstance(module, FakeQuantLinear) or isinstance(module, _torchao_fql()):
            lin = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                            device="meta")
            lin.weight, lin.bias = module.weight, module.bias
            module = lin
        return QATLinear.from_linear(module, scheme=config.scheme, mode=config.mode,
                                     group_size=config.group_size,
                                     act_fake_quant=config.activations, ste=config.ste)
    # convert: QATLinear -> AWQInt4Linear, anything else untouched (like torchao)
    if isinstance(module, _torchao_fql()):
        warnings.warn(f"AWQQATConfig convert: {name}a torchao FakeQuantizedLinear (prepared by "
                      "torchao's QATConfig) is left as it is; swap_torchao_qat_to_ours(model) "
                      "first to convert it to AWQ (else the export quantizes its float weight "
                      "by round to nearest)", stacklevel=2)
        return module
    if isinstance(module, QATLinear):
        try:
            return AWQInt4Linear.from_qat_linear(module)
        except ValueError as e:
            raise ValueError(
                f"{name}{e} [QATLinear(in_features={module.in_features}, out_features="
                f"{module.out_features}, scheme={module.scheme}, mode={module.mode}). Linears "
                "converted before this one compute exactly what they computed when prepared; "
                "after fixing this one, run convert again (converted modules are kept)]") from None
    return module


# --------------------------------------------------------------------------
# module swapping helpers
# --------------------------------------------------------------------------
def _swap_modules(model: nn.Module, make: Callable[[str, nn.Module], Optional[nn.Module]]
                  ) -> nn.Module:
    """Replace every module m (by identity, so shared modules stay shared)
    for which make(name, m) returns a module.  Returns the (possibly new) root."""
    new: Dict[int, nn.Module] = {}
    for name, mod in model.named_modules():
        if id(mod) in new:
            continue
        rep = make(name, mod)
        if rep is not None and rep is not mod:
            new[id(mod)] = rep
    if not new:
        return model
    for parent in list(model.modules()):
        # not named_children(): it yields a child used under two names only once
        for cname, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                setattr(parent, cname, new[id(child)])
    return new.get(id(model), model)


def _e4m3():
    return torch.float8_e4m3fn


def swap_torchao_qat_to_ours(model: nn.Module, *, ste: str = "autograd") -> nn.Module:
    """In place: every torchao `FakeQuantizedLinear` whose weight quantizer is an
    `Int4WeightFakeQuantizer` (and whose activation quantizer is None or a
    PerRow e4m3 `Float8FakeQuantizer` without bounds) becomes a QATLinear in
    mode "torchao" with the same Parameters and the same forward numerics
    (fp8 activations: ours gives 0, not NaN, for an all-zero row, and
    clamps a row's max at 1e-12 as SPEC 1 says, so rows of max |x| below
    1e-12 differ (bf16/fp32); in fp16,
    inputs or weight rows so small that torchao's scale reciprocals overflow
    give NaN/Inf there and finite values here).  Other torchao QAT modules
    (other quantizers, FakeQuantizedEmbedding) are left as they are, with a
    warning.  The `enabled` flags of torchao's quantizers carry over both
    ways.  Returns the model (a new object only if the root itself was
    swapped)."""
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.qat.fake_quantizer import (
        Float8FakeQuantizer,
        Int4WeightFakeQuantizer,
    )

    FQL = _torchao_fql()
    skipped: List[str] = []

    def make(name, mod):
        if not isinstance(mod, FQL):
            if getattr(mod, "weight_fake_quantizer", None) is not None:  # FakeQuantizedEmbedding
                skipped.append(f"{name or '<root>'}: {type(mod).__name__} (only Linears swap)")
            return None
        wq, aq = mod.weight_fake_quantizer, mod.activation_fake_quantizer
        if not isinstance(wq, Int4WeightFakeQuantizer):
            skipped.append(f"{name or '<root>'}: weight quantizer {type(wq).__name__}")
            return None
        adt = wq.config.activation_dtype
        scheme = "fp8_int4" if adt == _e4m3() else "int4_asym"
        act = False
        if aq is not None:
            c = aq.config
            ok = (isinstance(aq, Float8FakeQuantizer) and c.dtype == _e4m3() and
                  isinstance(c.granularity, PerRow) and c.granularity.dim in (-1, None) and
                  c.hp_value_lb is None and c.hp_value_ub is None)
            if not ok:
                skipped.append(f"{name or '<root>'}: activation quantizer {aq!r}")
                return None
            act = bool(aq.enabled)
        g = wq.config.group_size
        if g not in GROUP_SIZES:
            skipped.append(f"{name or '<root>'}: group_size {g}")
            return None
        new = QATLinear.from_linear(mod, scheme=scheme, mode="torchao", group_size=g,
                                    act_fake_quant=act, ste=ste)
        new.weight_fake_quant_enabled = bool(wq.enabled)
        new._torchao_act_quantizer = aq is not None  # so that the swap back rebuilds it as it was
        return new

    out = _swap_modules(model, make)
    if skipped:
        warnings.warn("swap_torchao_qat_to_ours left these torchao modules unchanged (no "
                      "equivalent op): " + "; ".join(skipped), stacklevel=2)
    return out


def swap_ours_to_torchao_qat(model: nn.Module) -> nn.Module:
    """In place: every QATLinear in mode "torchao" becomes torchao's
    FakeQuantizedLinear with Int4WeightFakeQuantizeConfig (and, when it fake-
    quantizes activations, a PerRow e4m3 Float8FakeQuantizeConfig), sharing the
    Parameters: what torchao's QATConfig(Int4WeightOnlyConfig() or
    Float8DynamicActivationInt4WeightConfig(), step="prepare") builds, so
    torchao's own convert step can follow.  Raises for mode "awq" modules
    (torchao has no AWQ-exact fake quant) or activations on int4_asym."""
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.qat.fake_quantize_config import (
        Float8FakeQuantizeConfig,
        Int4WeightFakeQuantizeConfig,
    )

    FQL = _torchao_fql()
    bad = [n or "<root>" for n, m in model.named_modules()
           if isinstance(m, QATLinear) and (m.mode != "torchao" or
                                            (m.act_fake_quant and m.scheme != "fp8_int4"))]
    if bad:
        raise ValueError("swap_ours_to_torchao_qat: torchao has no equivalent for mode 'awq' "
                         "(or fp8 activations with int4_asym) in: " + ", ".join(bad[:10]))

    odd = [n or "<root>" for n, m in model.named_modules()
           if isinstance(m, QATLinear) and m.scheme == "fp8_int4" and m.group_size != 128]
    if odd:
        import warnings

        warnings.warn("swap_ours_to_torchao_qat: torchao's Float8DynamicActivationInt4WeightConfig "
                      "converts with group size 128, but these fp8_int4 layers trained with "
                      f"another one: {', '.join(odd[:10])}; torchao's convert step would not "
                      "reproduce their fake quant", stacklevel=2)

    pure = [n or "<root>" for n, m in model.named_modules()
            if isinstance(m, QATLinear) and m.ste == "pure"]
    if pure:
        import warnings

        warnings.warn("swap_ours_to_torchao_qat: torchao's fake quantizers have no straight-"
                      "through option; these layers trained with ste='pure' get torchao's "
                      f"autograd gradient from now on: {', '.join(pure[:10])}", stacklevel=2)

    def make(name, mod):
        if not isinstance(mod, QATLinear):
            return None
        adt = _e4m3() if mod.scheme == "fp8_int4" else torch.bfloat16
        wcfg = Int4WeightFakeQuantizeConfig(group_size=mod.group_size, activation_dtype=adt)
        # an activation quantizer when fp8_int4 fake-quantizes activations, or when the
        # module came from torchao with one (possibly disabled): what torchao had
        had = getattr(mod, "_torchao_act_quantizer", mod.scheme == "fp8_int4")
        acfg = Float8FakeQuantizeConfig(dtype=_e4m3(), granularity=PerRow()) \
            if mod.act_fake_quant or had else None
        with torch.device("meta"):
            new = FQL(mod.in_features, mod.out_features, mod.bias is not None,
                      activation_config=acfg, weight_config=wcfg)
        new.weight, new.bias = mod.weight, mod.bias
        new.weight_fake_quantizer.enabled = mod.weight_fake_quant_enabled
        if new.activation_fake_quantizer is not None:
            new.activation_fake_quantizer.enabled = mod.act_fake_quant
        return new

    return _swap_modules(model, make)


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
def export_qat_awq(model: nn.Module, out_dir, **kwargs):
    """export_awq for prepared and converted models: checks that every
    QATLinear / AWQInt4Linear uses one group size, passes it as export_awq's
    group_size (it is what config.json records for the converted layers,
    whose tensors export_awq writes as they are), refuses a converted
    lm_head (AWQ consumers expect it in fp16), and adds the converted layers
    to the returned report (exact by construction).  Other kwargs go to
    export_awq."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # torch.compile / DataParallel: the names without their prefix

    def is_head(n):
        return n.rpartition(".")[2] in _HEAD_NAMES

    skip = _patterns(kwargs.get("modules_to_not_convert"))  # export_awq's checks and stripping

    out_emb = _output_embedding(model)
    heads = _output_embedding_names(model)

    def kept_fp16(n):  # what export_awq leaves in float16: its group size does not count
        return (is_head(n) or n in heads or n.rpartition(".")[2] in _ROUTER_NAMES
                or any(p in n for p in skip))

    conv = {n: m for n, m in model.named_modules() if isinstance(m, AWQInt4Linear)}
    groups = {m.group_size for n, m in model.named_modules()
              if isinstance(m, AWQInt4Linear) or (isinstance(m, FakeQuantLinear) and
                                                  not kept_fp16(n))}
    if len(groups) > 1:
        raise ValueError(f"an AWQ checkpoint has one group size; the model uses {sorted(groups)}")
    if kwargs.get("group_size", 0) is None:  # export_awq's default: the model's own
        del kwargs["group_size"]
    if groups:
        g = groups.pop()
        if kwargs.get("group_size", g) != g:
            raise ValueError(f"group_size={kwargs['group_size']} differs from the model's "
                             f"quantized layers ({g})")
        kwargs["group_size"] = g
    for n, m in conv.items():
        if is_head(n) or m is out_emb:
            raise ValueError(f"{n} is converted to int4, but AWQ checkpoints keep the output "
                             "projection in fp16 (consumers expect lm_head.weight); prepare "
                             "with filter_fn=awq_filter")
        if n.rpartition(".")[2] in _ROUTER_NAMES:
            raise ValueError(f"{n} is converted to int4, but it is a MoE router, which AWQ "
                             "consumers (vLLM) build unquantized; prepare with "
                             "filter_fn=awq_filter")
        if any(p in n for p in skip):
            raise ValueError(f"{n} is converted to int4 but matches modules_to_not_convert")
    report = export_awq(model, out_dir, **kwargs)
    for n, m in conv.items():
        report.layers.append(LayerReport(name=n, source="converted", scheme=m.scheme,
                                         mode=m.mode, group_size=m.group_size,
                                         shape=(m.out_features, m.in_features), exact=True,
                                         sqnr_db=float("inf")))
    return report
