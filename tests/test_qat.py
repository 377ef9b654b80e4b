"""quantize_ prepare / convert integration (ao_awq_export.qat), torchao swaps,
export of converted models, torch.compile / torch.export, and the QAT demo."""
import copy
import importlib.util
import io
import json
import os
import pathlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torchao.quantization import (
    Float8DynamicActivationInt4WeightConfig,
    Int4WeightOnlyConfig,
    quantize_,
)
from torchao.quantization.qat import QATConfig
from torchao.quantization.granularity import PerRow
from torchao.quantization.qat.fake_quantize_config import Float8FakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import Float8FakeQuantizer
from torchao.quantization.qat.linear import FakeQuantizedLinear
from transformers import LlamaConfig, LlamaForCausalLM

import ao_awq_export as aq
from ao_awq_export.export import FakeQuantLinear, export_awq
from ao_awq_export.qat import (
    AWQInt4Linear,
    AWQQATConfig,
    QATLinear,
    awq_filter,
    export_qat_awq,
    swap_ours_to_torchao_qat,
    swap_torchao_qat_to_ours,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # AWQ: logical column j at bits 4*ORDER[j]


def tiny_llama(dtype=torch.float32, seed=0):
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # spread the weights so the int4 grid matters
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return m


def ids(b=2, t=16, seed=1):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def unpack(packed):
    """Reference AWQ unpack (from the SPEC): int32 [R, C/8] -> int64 [R, C]."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(p >> (4 * ORDER[j])) & 0xF for j in range(8)], -1).reshape(
        packed.shape[0], -1)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 64, bias=False)
        self.head = nn.Linear(64, 50)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.b(F.silu(self.a(h))))


def head_filter(m, fqn):
    return isinstance(m, nn.Linear) and fqn != "head"


# --------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int4_asym", "fp8_int4"])
def test_prepare_keeps_parameters_and_keys(scheme):
    m = tiny_llama()
    keys = list(m.state_dict())
    params = dict(m.named_parameters())
    ref = copy.deepcopy(m)
    quantize_(m, AWQQATConfig(scheme=scheme, group_size=32), filter_fn=awq_filter)
    assert list(m.state_dict()) == keys
    for n, p in m.named_parameters():
        assert p is params[n], n  # the very same Parameter objects
    lin = [n for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    assert len(lin) == 15
    for n, x in m.named_modules():
        if isinstance(x, nn.Linear):
            assert isinstance(x, QATLinear) == (n != "lm_head"), n
            if n != "lm_head":
                assert isinstance(x, FakeQuantLinear)  # what export_awq recognizes
                assert (x.scheme, x.mode, x.group_size) == (scheme, "awq", 32)
                assert x.act_fake_quant == (scheme == "fp8_int4")
    assert type(m.model.embed_tokens) is nn.Embedding
    # the float model's state dict loads strictly into the prepared one
    m.load_state_dict(ref.state_dict(), strict=True)
    # the forward is the fake-quantized one, not the float one
    x = ids()
    with torch.no_grad():
        assert not torch.equal(m(x).logits, ref(x).logits)
        lay = m.model.layers[0].mlp.up_proj
        h = torch.randn(3, 64)
        fq = (aq.fake_quant_fp8_int4 if scheme == "fp8_int4" else aq.fake_quant_int4_asym)
        hin = aq.fake_quant_fp8_rows(h) if scheme == "fp8_int4" else h
        assert torch.equal(lay(h), F.linear(hin, fq(lay.weight, 32, mode="awq")))


@pytest.mark.parametrize("model_type", [
    "qwen2_5_vl", "qwen3_vl", "llava", "gemma3", "mllama", "idefics3", "internvl", "mistral3",
    "qwen2_audio", "llama4", "phi4_multimodal", "qwen2_5_omni_thinker"])
def test_awq_filter_takes_a_multimodal_model_s_text_decoder_only(model_type):
    """In a multimodal model (transformers' class for the model type, default
    config, built on the meta device) awq_filter takes the Linears of the text
    decoder (transformers' get_decoder()) but its routers, and none of the
    vision or audio towers and projectors around it, as AutoAWQ quantizes
    only the decoder's blocks; Phi-4-multimodal keeps its towers inside the
    decoder's module (embed_tokens_extend), and they are left out too."""
    import transformers as T
    from transformers.models.auto import modeling_auto as ma

    for names in (ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                  ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                  ma.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES):
        if model_type in names:
            cls = getattr(T, names[model_type])
            break
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        m = cls(T.AutoConfig.for_model(model_type))
    dec = {id(x) for x in m.get_decoder().modules()}
    lin = [(n, x) for n, x in m.named_modules() if isinstance(x, nn.Linear)]
    taken = {n for n, x in lin if awq_filter(x, n)}
    want = {n for n, x in lin if id(x) in dec and "embed_tokens_extend" not in n and
            n.rpartition(".")[2] not in ("lm_head", "gate", "router", "shared_expert_gate")}
    assert taken == want, (sorted(taken - want)[:5], sorted(want - taken)[:5])
    assert len(taken) >= 7 and len(taken) < len(lin) - 2


def test_falcon_linears_are_prepared(tmp_path):
    """transformers' FalconLinear (input @ weight.T + bias: nn.Linear's forward
    but for where the bias is added) is prepared like an nn.Linear: before,
    awq_filter left every Falcon layer out (a forward of its own), so QAT
    trained nothing and the export rounded the float weights to nearest."""
    import transformers as T

    torch.manual_seed(0)
    m = T.FalconForCausalLM(T.FalconConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=2)).eval()
    x = ids()
    with torch.no_grad():
        want = m(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no layer skipped with a warning)
        quantize_(m, AWQQATConfig(group_size=32), filter_fn=awq_filter)
    qat = [n for n, mod in m.named_modules() if isinstance(mod, QATLinear)]
    assert len(qat) == 8 and all(n.startswith("transformer.h.") for n in qat)
    for n in qat:
        m.get_submodule(n).weight_fake_quant_enabled = False
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, want, rtol=1e-5, atol=1e-5)
    for n in qat:
        m.get_submodule(n).weight_fake_quant_enabled = True
    m(x).logits.float().pow(2).mean().backward()
    assert all(m.get_submodule(n).weight.grad is not None for n in qat)
    rep = export_qat_awq(m, str(tmp_path / "awq"), progress=False)
    assert rep.all_exact and sorted(l.name for l in rep.layers) == sorted(qat)
    assert all(l.source == "fake_quant" for l in rep.layers)


def test_prepare_default_filter_embedding_and_errors():
    m = MLP()
    quantize_(m, AWQQATConfig(group_size=64, mode="torchao"))  # torchao's default: every Linear
    assert isinstance(m.head, QATLinear) and type(m.emb) is nn.Embedding
    # asking for the embedding is refused (AWQ keeps embeddings in fp16)
    with pytest.raises(ValueError, match="nn.Linear only"):
        quantize_(MLP(), AWQQATConfig(), filter_fn=lambda mod, f: isinstance(mod, nn.Embedding))
    # Linears the config cannot handle are left alone with a warning, like torchao's
    # Int4WeightOnlyConfig, and nothing fails half-way: the others are all prepared
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 64), nn.Linear(64, 64))
    lin2 = m[2]
    with pytest.warns(UserWarning, match=r"in_features=48.*not a multiple of group_size 32"):
        quantize_(m, AWQQATConfig(group_size=32))
    assert m[2] is lin2 and [type(x) for x in m] == [QATLinear, QATLinear, nn.Linear, QATLinear]
    # mode "awq" also leaves out_features % 8 != 0 (it could never convert); "torchao" keeps it
    m = MLP()
    head = m.head
    with pytest.warns(UserWarning, match=r"out_features=50.*multiple of 8"):
        quantize_(m, AWQQATConfig(group_size=64))
    assert m.head is head and isinstance(m.a, QATLinear) and isinstance(m.b, QATLinear)
    quantize_(m, AWQQATConfig(step="convert"))  # so convert never meets it
    assert isinstance(m.a, AWQInt4Linear) and m.head is head
    # a meta-device model (torchao's build-on-meta flow) prepares too, sharing its Parameters
    with torch.device("meta"):
        m = MLP()
    w = m.a.weight
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=head_filter)
    assert isinstance(m.a, QATLinear) and m.a.weight is w
    with pytest.raises(ValueError, match="scheme"):
        AWQQATConfig(scheme="int8")
    with pytest.raises(ValueError, match="mode"):
        AWQQATConfig(mode="gptq")
    with pytest.raises(ValueError, match="step"):
        AWQQATConfig(step="train")
    with pytest.raises(ValueError, match="group_size"):
        AWQQATConfig(group_size=48)
    # preparing twice with the same config is a no-op; another config re-wraps
    m = MLP()
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=head_filter)
    a = m.a
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=head_filter)
    assert m.a is a
    quantize_(m, AWQQATConfig(group_size=32, scheme="fp8_int4"), filter_fn=head_filter)
    assert m.a is not a and m.a.weight is a.weight and m.a.group_size == 32


# --------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["int4_asym", "fp8_int4"])
def test_convert_forward_bit_exact(scheme, dtype):
    m = tiny_llama(dtype)
    quantize_(m, AWQQATConfig(scheme=scheme, group_size=32), filter_fn=awq_filter)
    x = ids()
    weights = {n: x_.weight.detach().clone() for n, x_ in m.named_modules()
               if isinstance(x_, QATLinear)}
    with torch.no_grad():
        y_prep = m(x).logits
    quantize_(m, AWQQATConfig(scheme=scheme, group_size=32, step="convert"))
    conv = {n: x_ for n, x_ in m.named_modules() if isinstance(x_, AWQInt4Linear)}
    assert set(conv) == set(weights)
    assert not any(isinstance(x_, QATLinear) for x_ in m.modules())
    with torch.no_grad():
        y_conv = m(x).logits
    assert torch.equal(y_prep, y_conv)
    sd = m.state_dict()
    for n, mod in conv.items():
        assert {k.rsplit(".", 1)[1] for k in sd if k.startswith(n + ".")} <= {
            "qweight", "qzeros", "scales", "bias"}
        assert mod.qweight.dtype == torch.int32 and mod.scales.dtype == torch.float16
        codes, scales, zeros = aq.quantize_int4(weights[n], 32, scheme=scheme, mode="awq")
        assert torch.equal(mod.codes(), codes) and torch.equal(mod.zeros(), zeros)
        assert torch.equal(mod.scales, scales.t())
        # an unpack written from the SPEC agrees with the module's own
        assert torch.equal(unpack(mod.qweight).t(), codes.to(torch.int64))
        assert torch.equal(unpack(mod.qzeros).t(), zeros.to(torch.int64))
        fq = aq.fake_quant_fp8_int4 if scheme == "fp8_int4" else aq.fake_quant_int4_asym
        assert torch.equal(mod.dequantize(), fq(weights[n], 32, mode="awq"))


def test_convert_torchao_modes():
    # int4_asym/torchao has a float zero point: refused with advice
    m = MLP()
    quantize_(m, AWQQATConfig(mode="torchao", group_size=64), filter_fn=head_filter)
    with pytest.raises(ValueError, match="float zero point"):
        quantize_(m, AWQQATConfig(step="convert"), filter_fn=head_filter)
    # fp8_int4/torchao: convertible when the scales are fp16 values (fp16 weights) ...
    m = MLP().half()
    quantize_(m, AWQQATConfig(scheme="fp8_int4", mode="torchao", group_size=64),
              filter_fn=head_filter)
    x = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        y = m(x)
        quantize_(m, AWQQATConfig(step="convert"), filter_fn=head_filter)
        assert isinstance(m.a, AWQInt4Linear) and torch.equal(m(x), y)
    # ... (bf16 scales in fp16's normal range are fp16 values too) ...
    m = MLP().bfloat16()
    quantize_(m, AWQQATConfig(scheme="fp8_int4", mode="torchao", group_size=64),
              filter_fn=head_filter)
    with torch.no_grad():
        y = m(x)
        quantize_(m, AWQQATConfig(step="convert"), filter_fn=head_filter)
        assert isinstance(m.a, AWQInt4Linear) and torch.equal(m(x), y)
    # ... and with all-zero groups (scale 1e-6, no fp16 value; any scale gives their zeros)
    m = MLP().bfloat16()
    with torch.no_grad():
        m.b.weight[3, :64] = 0
        m.b.weight[5, 64:128] = torch.tensor([1e-9, -1e-9] * 32)  # codes all 8 too
    quantize_(m, AWQQATConfig(scheme="fp8_int4", mode="torchao", group_size=64),
              filter_fn=head_filter)
    s = aq.quantize_int4(m.b.weight.detach(), 64, scheme="fp8_int4", mode="torchao")[1]
    assert not torch.equal(s.to(torch.float16).to(s.dtype), s)
    with torch.no_grad():
        y = m(x)
        w = m.b.fake_quant_weight()
        quantize_(m, AWQQATConfig(step="convert"), filter_fn=head_filter)
        assert isinstance(m.b, AWQInt4Linear) and torch.equal(m(x), y)
        assert torch.equal(m.b.dequantize(), w)
    # ... but not fp32 scales
    m = MLP()
    quantize_(m, AWQQATConfig(scheme="fp8_int4", mode="torchao", group_size=64),
              filter_fn=head_filter)
    with pytest.raises(ValueError, match="not float16 values"):
        quantize_(m, AWQQATConfig(step="convert"), filter_fn=head_filter)


def test_awq_nibble_order():
    lin = nn.Linear(32, 8, bias=False)
    with torch.no_grad():  # codes 0..7 across the 8 outputs: AWQ packs to 0x75316420
        lin.weight.copy_(torch.arange(8.0).view(8, 1).expand(8, 32) - 4.0)
        lin.weight[:, 0] = -4.0
        lin.weight[:, 1] = 11.0
    q = QATLinear.from_linear(lin, group_size=32)
    c = AWQInt4Linear.from_qat_linear(q)
    codes = c.codes()
    assert torch.equal(codes[:, 2:].float() - codes[:, 2:2 + 1].float(),
                       torch.zeros_like(codes[:, 2:].float()))
    word = c.qweight[2, 0].item() & 0xFFFFFFFF
    nib = [(word >> (4 * ORDER[j])) & 0xF for j in range(8)]
    assert nib == codes[:, 2].tolist()
    assert torch.equal(unpack(aq.pack_awq(torch.arange(8, dtype=torch.uint8).view(8, 1))),
                       torch.arange(8).view(1, 8))
    assert aq.pack_awq(torch.arange(8, dtype=torch.uint8).view(8, 1)).item() == 0x75316420


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int4_asym", "fp8_int4"])
def test_export_converted_equals_export_prepared(tmp_path, scheme):
    m = tiny_llama()
    quantize_(m, AWQQATConfig(scheme=scheme, group_size=32), filter_fn=awq_filter)
    fq = {n: x.fake_quant_weight().detach() for n, x in m.named_modules()
          if isinstance(x, QATLinear)}
    rep_p = export_awq(m, tmp_path / "prepared", group_size=32, progress=False)
    assert rep_p.all_exact and len(rep_p.layers) == 14
    quantize_(m, AWQQATConfig(step="convert"))
    rep_c = export_qat_awq(m, tmp_path / "converted", progress=False)
    assert rep_c.all_exact and len(rep_c.layers) == 14
    a = load_file(tmp_path / "prepared" / "model.safetensors")
    b = load_file(tmp_path / "converted" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert "lm_head.weight" in b and "lm_head.qweight" not in b
    cfg = json.loads((tmp_path / "converted" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["version"],
            qc["zero_point"]) == ("awq", 4, 32, "gemm", True)
    # the file, dequantized independently, is the trained fake-quant weight, bit for bit
    for n, w in fq.items():
        q = unpack(b[n + ".qweight"]).float()
        z = unpack(b[n + ".qzeros"]).float().repeat_interleave(32, 0)
        s = b[n + ".scales"].float().repeat_interleave(32, 0)
        assert torch.equal(((q - z) * s).t().to(w.dtype), w), n


def test_messages_name_the_layer():
    """quantize_ passes its handler no module name; prepare's warnings and
    convert's errors take it from torchao's traversal that called the
    handler for that module, whatever the filter (never a stale one)."""
    def model():
        return nn.Sequential(nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 48),
                                                              nn.Linear(48, 64)))
    cfg = AWQQATConfig(group_size=32)
    for filt in (awq_filter, None, lambda mod, f: awq_filter(mod),
                 lambda mod, f: isinstance(mod, nn.Linear)):
        with pytest.warns(UserWarning, match=r"prepare: 1\.1: Linear\(in_features=48"):
            quantize_(model(), cfg, filter_fn=filt)
    m = model()
    with warnings.catch_warnings(record=True) as rec:  # a filter that leaves 1.1 out
        warnings.simplefilter("always")
        quantize_(m, cfg, filter_fn=lambda mod, f: awq_filter(mod, f) and f != "1.1")
    assert not [w for w in rec if "in_features=48" in str(w.message)]
    with pytest.warns(UserWarning, match=r"prepare: proj: Linear\(in_features=48"):
        quantize_(nn.ModuleDict({"proj": m[1][1]}), cfg)  # the same module, another name
    with pytest.warns(UserWarning, match=r"prepare: <model>: Linear\(in_features=48"):
        quantize_(m[1][1], cfg)  # the root itself
    from torchao.quantization import FqnToConfig
    with pytest.warns(UserWarning, match=r"prepare: 1\.1: Linear\(in_features=48"):
        quantize_(model(), FqnToConfig({"1.1": cfg}), filter_fn=None)
    cm = torch.compile(model())
    with pytest.warns(UserWarning, match=r"prepare: 1\.1: Linear\(in_features=48"):
        quantize_(cm, cfg)  # (as the export writes it: no _orig_mod.)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    quantize_(m, AWQQATConfig(group_size=32, scheme="int4_asym", mode="torchao"),
              filter_fn=awq_filter)
    with pytest.raises(ValueError, match=r"^0: convert: int4_asym in mode 'torchao'"):
        quantize_(m, AWQQATConfig(step="convert"), filter_fn=awq_filter)
    with pytest.raises(ValueError, match=r"^0: convert: int4_asym in mode 'torchao'"):
        quantize_(m, AWQQATConfig(step="convert"))  # torchao's default filter
    # called outside quantize_: no name
    from ao_awq_export.qat import _awq_qat_transform
    with pytest.raises(ValueError, match=r"^convert: int4_asym in mode 'torchao'"):
        _awq_qat_transform(m[0], AWQQATConfig(step="convert"))


def test_export_refuses_converted_lm_head_and_mixed_groups(tmp_path):
    m = tiny_llama()
    quantize_(m, AWQQATConfig(group_size=32))  # default filter: lm_head too
    quantize_(m, AWQQATConfig(step="convert"))
    with pytest.raises(ValueError, match="lm_head"):
        export_qat_awq(m, tmp_path / "x", progress=False)
    m = MLP()
    quantize_(m, AWQQATConfig(group_size=32), filter_fn=lambda x, f: f == "a")
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=lambda x, f: f == "b")
    with pytest.raises(ValueError, match="one group size"):
        export_qat_awq(m, tmp_path / "y", progress=False)
    with pytest.raises(ValueError, match="differs"):
        m2 = MLP()
        quantize_(m2, AWQQATConfig(group_size=32), filter_fn=head_filter)
        export_qat_awq(m2, tmp_path / "z", group_size=64, progress=False)
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
    # group_size=None is export_awq's default (the model's own), not a mismatch
    assert export_qat_awq(m2, tmp_path / "n", group_size=None, modules_to_not_convert=["head"],
                          progress=False).group_size == 32


# --------------------------------------------------------------------------
# save / load, compile, export
# --------------------------------------------------------------------------
def test_save_load_round_trip():
    m = tiny_llama()
    quantize_(m, AWQQATConfig(scheme="fp8_int4", group_size=32), filter_fn=awq_filter)
    x = ids()
    with torch.no_grad():
        y = m(x).logits
    # state dict into a freshly prepared model
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = tiny_llama(seed=5)
    quantize_(m2, AWQQATConfig(scheme="fp8_int4", group_size=32), filter_fn=awq_filter)
    m2.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(m2(x).logits, y)
    # the whole (pickled) module
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    assert isinstance(m3.model.layers[0].self_attn.q_proj, QATLinear)
    with torch.no_grad():
        assert torch.equal(m3(x).logits, y)
    # converted: state dict round trip and pickle
    quantize_(m, AWQQATConfig(step="convert"))
    with torch.no_grad():
        y = m(x).logits
    m4 = tiny_llama(seed=6)
    quantize_(m4, AWQQATConfig(scheme="fp8_int4", group_size=32), filter_fn=awq_filter)
    quantize_(m4, AWQQATConfig(step="convert"))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m4.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m5 = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(m4(x).logits, y) and torch.equal(m5(x).logits, y)


def test_cli_refuses_a_converted_state_dict_saying_why(tmp_path):
    """A converted model's state dict has qweight/qzeros where the plain
    model built from --hf-config has weights: the CLI says so and what to do
    instead (it listed the unexpected keys only)."""
    m = tiny_llama()
    quantize_(m, AWQQATConfig(group_size=32), filter_fn=awq_filter)
    quantize_(m, AWQQATConfig(step="convert"))
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    m.config.save_pretrained(tmp_path / "hf")
    from ao_awq_export.__main__ import main
    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["export", str(tmp_path / "sd.pt"), str(tmp_path / "o"), "--hf-config",
                   str(tmp_path / "hf"), "--group-size", "32", "--no-progress"])
    assert rc == 1 and "holds AWQ tensors" in err.getvalue() and "--allow-pickle" in \
        err.getvalue(), err.getvalue()
    assert not (tmp_path / "o").exists()


def _small():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64), nn.SiLU(),
                      nn.Linear(64, 32))
    quantize_(m, AWQQATConfig(scheme="fp8_int4", group_size=32),
              filter_fn=lambda x, f: f == "0")
    quantize_(m, AWQQATConfig(scheme="int4_asym", group_size=64),
              filter_fn=lambda x, f: f == "2")
    return m


def test_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    m = _small()
    x = torch.randn(4, 7, 64)
    y = m(x)
    y.sum().backward()
    g_eager = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    yc = cm(x)
    yc.sum().backward()
    assert torch.equal(y, yc)
    for a, p in zip(g_eager, m.parameters()):
        assert torch.equal(a, p.grad)
    expl = torch._dynamo.explain(m)(x)
    assert expl.graph_break_count == 0 and expl.graph_count == 1
    # inductor, forward and backward
    torch._dynamo.reset()
    m.zero_grad()
    yi = torch.compile(m, fullgraph=True)(x)
    yi.sum().backward()
    torch.testing.assert_close(yi, y, rtol=1e-5, atol=1e-5)
    for a, p in zip(g_eager, m.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)
    # inductor on the converted model
    quantize_(m, AWQQATConfig(step="convert"))
    with torch.no_grad():
        yq = m(x)
        yi = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(yi, yq, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compile_fullgraph_prepared_llama():
    torch._dynamo.reset()
    m = tiny_llama()
    quantize_(m, AWQQATConfig(scheme="fp8_int4", group_size=32), filter_fn=awq_filter)
    x = ids()
    y = m(input_ids=x, labels=x)
    y.loss.backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    yc = torch.compile(m, fullgraph=True, backend="aot_eager")(input_ids=x, labels=x)
    yc.loss.backward()
    assert torch.equal(yc.logits, y.logits)
    for a, p in zip(g, m.parameters()):
        assert torch.equal(a, p.grad)
    torch._dynamo.reset()


def test_torch_export_captures_our_ops():
    m = _small()
    x = torch.randn(4, 64)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "ao_awq.fq_weight.default" in targets, targets
    assert "ao_awq.fp8_rows.default" in targets, targets
    assert torch.equal(ep.module()(x), m(x))


# --------------------------------------------------------------------------
# torchao interop
# --------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["int4_weight_only", "fp8_act_int4_weight"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torchao_prepared_swap_bit_identical(base, dtype):
    if base == "int4_weight_only":
        cfg, scheme, act = Int4WeightOnlyConfig(group_size=32), "int4_asym", False
    else:
        cfg, scheme, act = Float8DynamicActivationInt4WeightConfig(), "fp8_int4", True
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 128), nn.SiLU(), nn.Linear(128, 128)).to(dtype)
    quantize_(m, QATConfig(cfg, step="prepare"))
    assert all(isinstance(m[i], FakeQuantizedLinear) for i in (0, 2))
    params = [p for p in m.parameters()]
    x = torch.randn(3, 5, 256, dtype=dtype)
    y_ao = m(x)
    y_ao.float().square().sum().backward()
    g_ao = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()

    out = swap_torchao_qat_to_ours(m)
    assert out is m
    for i in (0, 2):
        assert isinstance(m[i], QATLinear)
        assert (m[i].scheme, m[i].mode, m[i].act_fake_quant) == (scheme, "torchao", act)
    assert all(a is b for a, b in zip(params, m.parameters()))
    y_ours = m(x)
    assert torch.equal(y_ours, y_ao)
    y_ours.float().square().sum().backward()
    # gradients: the ops' contract (tests/test_fake_quant.py) is bit-exact except at the
    # group / row extremes, whose reduction order differs from torch's: bound the rest
    eps = torch.finfo(dtype).eps
    exact = aq.ops.TORCH_SUM_VW > 0 and (dtype == torch.float32 or aq.ops.TORCH_SUM_HALF)
    for a, p in zip(g_ao, m.parameters()):
        if exact:  # our CPU kernels sum in torch's order: every gradient bit for bit
            assert torch.equal(p.grad, a)
        else:
            torch.testing.assert_close(p.grad, a, rtol=0, atol=64 * eps * a.abs().max().item())
    m.zero_grad()

    swap_ours_to_torchao_qat(m)
    assert all(isinstance(m[i], FakeQuantizedLinear) for i in (0, 2))
    assert (m[0].activation_fake_quantizer is not None) == act
    assert all(a is b for a, b in zip(params, m.parameters()))
    assert torch.equal(m(x), y_ao)
    # torchao's convert step accepts the swapped-back model's modules
    assert m[0].weight_fake_quantizer.config.group_size == (32 if not act else 128)


@pytest.mark.parametrize("w_on", [True, False])
@pytest.mark.parametrize("act", ["none", "on", "off"])
def test_torchao_swap_keeps_enabled_flags_and_quantizers(w_on, act):
    """torchao's `enabled` flags and the presence of an activation quantizer
    survive the swap to our ops and back, and the forward equals torchao's in
    every state."""
    from torchao.quantization.qat.fake_quantize_config import (
        Float8FakeQuantizeConfig,
        Int4WeightFakeQuantizeConfig,
    )
    from torchao.quantization.granularity import PerRow

    acfg = None if act == "none" else Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow())
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 64)).to(torch.bfloat16)
    quantize_(m, QATConfig(activation_config=acfg,
                           weight_config=Int4WeightFakeQuantizeConfig(group_size=128),
                           step="prepare"))
    m[0].weight_fake_quantizer.enabled = w_on
    if act == "off":
        m[0].activation_fake_quantizer.enabled = False
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y_ao = m(x)
    swap_torchao_qat_to_ours(m)
    assert isinstance(m[0], QATLinear) and m[0].scheme == "fp8_int4"
    assert m[0].weight_fake_quant_enabled == w_on and m[0].act_fake_quant == (act == "on")
    with torch.no_grad():
        assert torch.equal(m(x), y_ao)
        if not w_on or act == "on":  # the flags matter: the other setting computes otherwise
            m[0].weight_fake_quant_enabled, m[0].act_fake_quant = True, False
            assert not torch.equal(m(x), y_ao)
            m[0].weight_fake_quant_enabled, m[0].act_fake_quant = w_on, act == "on"
    swap_ours_to_torchao_qat(m)
    assert isinstance(m[0], FakeQuantizedLinear)
    assert m[0].weight_fake_quantizer.enabled == w_on
    aq_ = m[0].activation_fake_quantizer
    assert (aq_ is None) == (act == "none")
    if aq_ is not None:
        assert aq_.enabled == (act == "on")
    with torch.no_grad():
        assert torch.equal(m(x), y_ao)
    # a converted model must compute what the prepared one did: a disabled weight fake
    # quant cannot become int4, and the error says the model is left usable
    swap_torchao_qat_to_ours(m)
    if not w_on:
        with pytest.raises(ValueError, match=r"weight fake quant is disabled.*run convert again"):
            quantize_(m, AWQQATConfig(step="convert"))
        assert isinstance(m[0], QATLinear)
        m[0].weight_fake_quant_enabled = True
    m.half()  # fp8_int4/torchao converts exactly when its scales are fp16 values
    xh = x.half()
    with torch.no_grad():
        y = m(xh)
        quantize_(m, AWQQATConfig(step="convert"))
        assert isinstance(m[0], AWQInt4Linear) and torch.equal(m(xh), y)


def test_torchao_swap_warns_about_modules_it_leaves():
    from torchao.quantization.qat.embedding import FakeQuantizedEmbedding

    m = MLP()
    quantize_(m, QATConfig(Int4WeightOnlyConfig(group_size=32), step="prepare"),
              filter_fn=lambda mod, f: isinstance(mod, (nn.Linear, nn.Embedding)))
    assert isinstance(m.emb, FakeQuantizedEmbedding)
    with pytest.warns(UserWarning, match=r"emb: FakeQuantizedEmbedding"):
        swap_torchao_qat_to_ours(m)
    assert isinstance(m.a, QATLinear) and isinstance(m.emb, FakeQuantizedEmbedding)


def test_awq_filter_leaves_output_projections():
    assert awq_filter(nn.Linear(8, 8), "model.layers.0.mlp.up_proj")
    for fqn in ("lm_head", "model.lm_head", "embed_out", "gpt_neox.embed_out"):
        assert not awq_filter(nn.Linear(8, 8), fqn)
    assert not awq_filter(nn.Embedding(8, 8), "model.embed_tokens")


def test_swap_back_refuses_awq_mode():
    m = MLP()
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=head_filter)
    with pytest.raises(ValueError, match="mode 'awq'"):
        swap_ours_to_torchao_qat(m)
    # fp8_int4 with a group size torchao's fp8-int4 convert does not use: warned
    m = MLP()
    quantize_(m, AWQQATConfig(scheme="fp8_int4", mode="torchao", group_size=64),
              filter_fn=head_filter)
    with pytest.warns(UserWarning, match="group size 128"):
        swap_ours_to_torchao_qat(m)


def test_swap_keeps_shared_modules_shared():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    quantize_(m, QATConfig(Int4WeightOnlyConfig(group_size=32), step="prepare"))
    m.append(m[0])  # one FakeQuantizedLinear used twice
    swap_torchao_qat_to_ours(m)
    assert isinstance(m[0], QATLinear) and m[0] is m[2]


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int4_asym", "fp8_int4"])
def test_short_qat_run_lowers_loss(scheme):
    m = tiny_llama()
    m.train()
    quantize_(m, AWQQATConfig(scheme=scheme, group_size=32), filter_fn=awq_filter)
    x = ids(4, 32, seed=3)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = m(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in m.parameters() if p.requires_grad and p.dim() == 2
                   and p is not m.model.embed_tokens.weight)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    # what was trained is what is exported
    quantize_(m, AWQQATConfig(step="convert"))
    assert sum(isinstance(x_, AWQInt4Linear) for x_ in m.modules()) == 14


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """transformers' gradient checkpointing (Trainer's gradient_checkpointing=True)
    recomputes the fake quants in the backward: the same loss and gradients."""
    def grads(ckpt):
        m = tiny_llama()
        m.train()
        quantize_(m, AWQQATConfig(scheme="fp8_int4", group_size=32), filter_fn=awq_filter)
        if ckpt:
            m.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert m.is_gradient_checkpointing
        x = ids(2, 16, seed=5)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    loss0, g0 = grads(False)
    loss1, g1 = grads(True)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and any("q_proj" in n for n in g0)
    assert all(torch.equal(g0[n], g1[n]) for n in g0), [n for n in g0 if not torch.equal(g0[n], g1[n])]


def _load_demo():
    spec = importlib.util.spec_from_file_location("qat_to_awq", ROOT / "examples" /
                                                  "qat_to_awq.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_demo_chunked_cross_entropy_matches_unfused():
    demo = _load_demo()
    torch.manual_seed(0)
    h = torch.randn(1000, 64, dtype=torch.float64, requires_grad=True)
    w = (0.3 * torch.randn(3000, 64, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 3000, (1000,))
    ref = F.cross_entropy(h @ w.t(), y)
    g_ref = torch.autograd.grad(3.0 * ref, (h, w))
    for chunk in (1, 256, 999, 4096):  # ragged last chunk, one chunk for all
        loss = demo.LinearCrossEntropy.apply(h, w, y, chunk)
        g = torch.autograd.grad(3.0 * loss, (h, w))  # backward scales by the incoming grad
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


def test_demo_chunked_cross_entropy_underflow_and_bf16_matmuls():
    """The loss comes from -log(softmax[target]); where that probability
    underflows float32 the row is redone through logsumexp.  With bf16 matmuls
    (mixed precision) the loss and float32 gradients stay within bf16
    rounding of the float64 reference."""
    demo = _load_demo()
    torch.manual_seed(0)
    h = 8 * torch.randn(1000, 64, dtype=torch.float64)
    w = 0.3 * torch.randn(3000, 64, dtype=torch.float64)
    y = torch.randint(0, 3000, (1000,))
    hd, wd = h.clone().requires_grad_(), w.clone().requires_grad_()
    rows = F.cross_entropy(hd @ wd.t(), y, reduction="none")
    assert (rows > 110).sum() > 10  # float32 exp(-110) is 0: those rows take the fallback
    g_ref = torch.autograd.grad(rows.mean(), (hd, wd))
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    loss = demo.LinearCrossEntropy.apply(hf, wf, y, 256)
    g = torch.autograd.grad(loss, (hf, wf))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), rows.mean().detach(), rtol=1e-4, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5 * b.abs().max().item())

    h = h / 8
    hd, wd = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(hd @ wd.t(), y)
    g_ref = torch.autograd.grad(ref, (hd, wd))
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    loss = demo.LinearCrossEntropy.apply(hf, wf, y, 256, torch.bfloat16)
    g = torch.autograd.grad(loss, (hf, wf))
    assert loss.dtype == g[0].dtype == g[1].dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=5e-4, atol=0)
    for a, b in zip(g, g_ref):  # bf16 has 8 significant bits: relative error ~ 2**-9
        assert ((a.double() - b).norm() / b.norm()).item() < 0.02


def test_demo_lm_loss_equals_the_models_own_logits_loss():
    """lm_loss (hidden states -> chunked linear + cross entropy) is the loss of
    LlamaForCausalLM's logits on the next token, with the same gradients."""
    import argparse as ap_

    demo = _load_demo()
    model = demo.build_model(ap_.Namespace(vocab=300, hidden=64, layers=2, seq=32, seed=0))
    xy = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=xy[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, 300), xy[:, 1:].reshape(-1))
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    loss = demo.lm_loss(model, xy, chunk=40)  # 96 rows: 40 + 40 + 16
    g = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref):
        assert b.abs().max() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item(), msg=name)


def test_demo_lr_schedule_decays_to_zero_over_the_qat_steps():
    import argparse as ap_

    demo = _load_demo()
    a = ap_.Namespace(lr=3e-3, steps=2400, qat_steps=800)
    plain = ap_.Namespace(lr=3e-3, steps=2400)  # no tail: warmup + cosine to 0.1 x lr
    assert [demo.lr_at(s, a) for s in range(1600)] == [demo.lr_at(s, plain) for s in range(1600)]
    assert demo.lr_at(2399, plain) == pytest.approx(3e-4, rel=1e-5)
    l0 = demo.lr_at(1600, plain)
    assert l0 == pytest.approx(3e-3 * 0.3468, rel=1e-3)
    for s in (1600, 2000, 2399):  # float and QAT runs share this
        assert demo.lr_at(s, a) == pytest.approx(l0 * (2400 - s) / 800, rel=1e-12)


@pytest.mark.parametrize("preset", ["small", "2m"])
def test_demo_quick(tmp_path, preset, monkeypatch):
    demo = _load_demo()
    seen, lm_loss = set(), demo.lm_loss

    def spy(model, xy, chunk=256, mm_dtype=None):
        seen.add(mm_dtype)
        return lm_loss(model, xy, chunk, mm_dtype)

    monkeypatch.setattr(demo, "lm_loss", spy)
    r = demo.main(["--quick", "--preset", preset, "--out", str(tmp_path)])
    assert r["convert_equal"] and r["file_equal"] and r["exact"]
    # training's lm_head matmuls: bf16 (mixed precision) with the BPE vocabulary only
    head = torch.float32 if preset == "small" else torch.bfloat16
    assert seen == {head} and r["head_dtype"] == {"small": "fp32", "2m": "bf16"}[preset]
    vocab = 256 if preset == "small" else 16384
    for k in ("float", "ptq", "qat"):
        assert 1.0 < r[k] < vocab
    assert os.path.isfile(tmp_path / "qat_awq" / "model.safetensors")
    for d in ("ptq_awq", "qat_awq"):  # the preset's vocabulary and group size
        with open(tmp_path / d / "config.json") as f:
            cfg = json.load(f)
        assert cfg["vocab_size"] == vocab
        assert cfg["quantization_config"]["group_size"] == {"small": 32, "2m": 64}[preset]
        # the BPE preset's tokenizer goes with the exports (vLLM reads it there)
        assert os.path.isfile(tmp_path / d / "tokenizer.json") == (preset == "2m")
    assert sorted(os.listdir(tmp_path)) == ["ptq_awq", "qat_awq"]
    if preset == "2m":
        from transformers import AutoTokenizer
        t = AutoTokenizer.from_pretrained(str(tmp_path / "qat_awq"))
        assert t.decode(t.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


def test_demo_presets_and_overrides(monkeypatch):
    demo = _load_demo()
    assert demo.PRESETS["2m"] == dict(text="stdlib", vocab=16384, group_size=64, steps=1200,
                                      qat_steps=400)
    assert demo.PRESETS["small"] == dict(text="pydoc", vocab=256, group_size=32, steps=2400,
                                         qat_steps=800)
    # the default is the 2m preset; explicit options override a preset's values
    ap_args = {}

    def fake_load_text(args):  # stop main() right after argument handling
        ap_args.update(vars(args))
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "load_text", fake_load_text)
    for argv, want in (([], dict(demo.PRESETS["2m"], head_dtype="bf16")),
                       (["--preset", "small", "--group-size", "64", "--steps", "300",
                         "--qat-steps", "100"],
                        dict(text="pydoc", vocab=256, group_size=64, steps=300, qat_steps=100,
                             head_dtype="fp32")),
                       (["--vocab", "512"], dict(text="stdlib", vocab=512, steps=1200)),
                       (["--quick"], dict(steps=12, qat_steps=6, layers=2, group_size=64))):
        ap_args.clear()
        with pytest.raises(KeyboardInterrupt):
            demo.main(argv)
        assert {k: ap_args[k] for k in want} == want, argv


# --------------------------------------------------------------------------
# review fixes: dtype casts after convert, empty batches, argument checks
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cast", ["bfloat16", "half", "to", "type"])
def test_converted_module_follows_dtype_casts(cast):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 64))
    quantize_(m, AWQQATConfig(group_size=64))
    quantize_(m, AWQQATConfig(group_size=64, step="convert"))
    lin = m[0]
    assert isinstance(lin, AWQInt4Linear)
    scales, qweight = lin.scales.clone(), lin.qweight.clone()
    dt = torch.float16 if cast == "half" else torch.bfloat16
    if cast == "to":
        m.to(dt)
    elif cast == "type":
        m.type(dt)  # casts every buffer, integer ones included
    else:
        getattr(m, cast)()
    # the exact fp16 scales and the integer words are untouched; compute follows the cast
    assert lin.scales.dtype == torch.float16 and torch.equal(lin.scales, scales)
    assert torch.equal(lin.qweight, qweight) and lin.weight_dtype == dt
    x = torch.randn(3, 128, dtype=dt)
    y = m(x)
    assert y.dtype == dt
    w = lin.dequantize()
    assert w.dtype == dt and torch.equal(y, F.linear(x, w, lin.bias))


def test_fp8_activation_fake_quant_accepts_empty_batches():
    x = torch.randn(0, 128, dtype=torch.bfloat16, requires_grad=True)
    y = aq.fake_quant_fp8_rows(x)
    assert y.shape == (0, 128) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == (0, 128)
    with pytest.raises(ValueError, match="must not be empty"):
        aq.fake_quant_fp8_rows(torch.randn(4, 0))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 64)).to(torch.bfloat16)
    quantize_(m, QATConfig(Float8DynamicActivationInt4WeightConfig(), step="prepare"))
    ref = m(torch.randn(0, 128, dtype=torch.bfloat16))
    swap_torchao_qat_to_ours(m)
    assert m(torch.randn(2, 0, 128, dtype=torch.bfloat16)).shape == (2, 0, 64)
    assert m(torch.randn(0, 128, dtype=torch.bfloat16)).shape == ref.shape


def test_config_and_dequantize_argument_checks():
    import numpy as np

    for bad in (64.0, np.int64(64)):
        with pytest.raises(TypeError, match="group_size must be an int"):
            AWQQATConfig(group_size=bad)
    for kw in (dict(scheme=[]), dict(mode={}), dict(ste=None)):  # unhashable / not str
        with pytest.raises(ValueError, match="must be one of"):
            AWQQATConfig(**kw)
    with pytest.raises(ValueError, match="group_size must be one of"):
        AWQInt4Linear(96, 16, group_size=48)
    torch.manual_seed(0)
    w = torch.randn(8, 128, requires_grad=True)
    c, s, z = aq.quantize_int4(w, 64, scheme="int4_asym", mode="awq")
    assert not (s.requires_grad or z.requires_grad)  # integers: nothing to differentiate
    ok = aq.dequantize_int4(c, s, z, scheme="int4_asym", mode="awq", dtype=torch.float32)
    assert torch.equal(ok, aq.fake_quant_int4_asym(w.detach(), 64, mode="awq"))
    for args, err, msg in (((c, s[:1], z[:1]), ValueError, r"\[N, K/g\] = \[8, 2\]"),
                           ((c, s[:, :0], z[:, :0]), ValueError, "scales must be"),
                           ((c, torch.ones(8, 3, dtype=torch.float16), z), ValueError,
                            "scales must be"),
                           ((c.float(), s, z), TypeError, "codes must be uint8"),
                           ((c, s, z[:, :1]), ValueError, "scales and zeros")):
        with pytest.raises(err, match=msg):
            aq.dequantize_int4(*args, scheme="int4_asym", mode="awq")


class _Router(nn.Linear):
    """A MoE router subclassing nn.Linear with a forward of its own (as
    transformers' PhimoeTopKRouter): (logits, top-k weights, indices)."""

    def forward(self, x):
        logits = F.linear(x, self.weight)
        w, i = torch.topk(logits.softmax(-1), 2)
        return logits, w, i


class _Moe(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(64, 8, bias=False)  # a plain Linear router (Mixtral, Qwen-MoE)
        self.router = _Router(64, 16, bias=False)
        self.up = nn.Linear(64, 64)

    def forward(self, x):
        return self.up(x) + self.gate(x).sum(-1, keepdim=True) + self.router(x)[0].sum(-1, keepdim=True)


def test_awq_filter_leaves_routers_and_linears_with_their_own_forward(tmp_path):
    """Routers stay fp16 in AWQ checkpoints (vLLM builds them unquantized) and
    a Linear subclass's own forward must not be replaced by QATLinear's."""
    for fqn in ("model.layers.0.mlp.gate", "mlp.router", "mlp.shared_expert_gate"):
        assert not awq_filter(nn.Linear(64, 8), fqn)
    assert not awq_filter(_Router(64, 16), "mlp.experts_router")
    torch.manual_seed(0)
    m = _Moe()
    x = torch.randn(3, 64)
    ref = m(x)
    quantize_(m, AWQQATConfig(group_size=32), filter_fn=awq_filter)
    assert type(m.gate) is nn.Linear and type(m.router) is _Router and isinstance(m.up, QATLinear)
    m(x)  # the router's forward still returns its tuple
    with pytest.warns(UserWarning, match="forward of its own"):
        quantize_(m, AWQQATConfig(group_size=32), filter_fn=lambda mod, f: f == "router")
    assert type(m.router) is _Router
    quantize_(m, AWQQATConfig(step="convert"), filter_fn=awq_filter)
    assert isinstance(m.up, AWQInt4Linear) and type(m.gate) is nn.Linear
    export_qat_awq(m, tmp_path / "o", progress=False)
    keys = set(load_file(str(tmp_path / "o" / "model.safetensors")))
    assert {"gate.weight", "router.weight", "up.qweight"} <= keys and "gate.qweight" not in keys
    # a router converted anyway (a filter of one's own) is refused
    m2 = _Moe()
    quantize_(m2, AWQQATConfig(group_size=32), filter_fn=lambda mod, f: f in ("gate", "up"))
    quantize_(m2, AWQQATConfig(step="convert"))
    with pytest.raises(ValueError, match="gate is converted to int4, but it is a MoE router"):
        export_qat_awq(m2, tmp_path / "o2", progress=False)
    assert ref.shape == m(x).shape


def test_export_qat_awq_unwraps_and_ignores_excluded_group_sizes(tmp_path):
    """export_qat_awq through nn.DataParallel / torch.compile still refuses a
    converted output projection and reports the model's own names; a layer
    named in modules_to_not_convert does not count in the one-group-size
    check."""
    class OutProj(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)
            self.out = nn.Linear(64, 96, bias=False)

        def get_output_embeddings(self):
            return self.out

    m = OutProj()
    quantize_(m, AWQQATConfig(group_size=32))
    quantize_(m, AWQQATConfig(step="convert"))
    for w in (m, nn.DataParallel(m), torch.compile(m)):
        with pytest.raises(ValueError, match="out is converted to int4"):
            export_qat_awq(w, tmp_path / "x", progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        export_qat_awq({"proj.weight": torch.zeros(64, 64)}, tmp_path / "x", progress=False)
    m = MLP()
    quantize_(m, AWQQATConfig(group_size=32), filter_fn=lambda x, f: f == "a")
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=lambda x, f: f == "b")
    rep = export_qat_awq(torch.compile(m), tmp_path / "y", modules_to_not_convert=["b", "head"],
                         progress=False)
    assert [(l.name, l.group_size) for l in rep.layers] == [("a", 32)]
    assert rep.modules_to_not_convert == ["b", "head"]
    assert not os.path.exists(tmp_path / "x")


def test_export_with_weight_fake_quant_disabled_writes_what_the_model_computes(tmp_path, caplog):
    """weight_fake_quant_enabled=False: the forward uses the float weight, so
    the export rounds that weight to nearest and says it is not exact (and an
    excluded layer keeps the float weight, not a fake-quant one it never
    used)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    quantize_(m, AWQQATConfig(group_size=32))
    m[1].weight_fake_quant_enabled = False
    m[2].weight_fake_quant_enabled = False
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        rep = export_awq(m, str(tmp_path / "o"), group_size=32, modules_to_not_convert=["2"], progress=False)
    assert "weight fake quant is disabled" in caplog.text
    layers = {l.name: l for l in rep.layers}
    assert layers["0"].exact and layers["0"].source == "fake_quant"
    assert layers["1"].source == "rtn" and not layers["1"].exact and 10 < layers["1"].sqnr_db < 60
    t = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.equal(t["2.weight"], m[2].weight.detach().half())
    codes = unpack(t["1.qweight"]).float()
    z = unpack(t["1.qzeros"]).float().repeat_interleave(32, 0)
    w1 = (codes - z) * t["1.scales"].float().repeat_interleave(32, 0)
    ref_codes, ref_s, ref_z = aq.quantize_int4(m[1].weight.detach(), 32, scheme="int4_asym", mode="awq")
    assert torch.equal(codes.t().to(torch.uint8), ref_codes)
    assert torch.allclose(w1.t(), m[1].weight.detach(), atol=float(ref_s.float().max()))


def test_convert_warns_about_torchao_prepared_linears_and_meta_weights():
    m = nn.Sequential(nn.Linear(64, 64))
    quantize_(m, QATConfig(Int4WeightOnlyConfig(group_size=32), step="prepare"))
    assert isinstance(m[0], FakeQuantizedLinear)
    with pytest.warns(UserWarning, match="swap_torchao_qat_to_ours"):
        quantize_(m, AWQQATConfig(step="convert"), filter_fn=awq_filter)
    assert isinstance(m[0], FakeQuantizedLinear)
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(64, 64))
    quantize_(m, AWQQATConfig(group_size=32))
    with pytest.raises(ValueError, match="meta device"):
        quantize_(m, AWQQATConfig(step="convert"))


def test_fp8_rows_keep_the_layout_of_a_strided_input():
    """torchao's elementwise fake quant keeps x's strides (a matmul after it
    sums in the order they give): so does ours."""
    x = torch.randn(4, 6, 64, dtype=torch.bfloat16).transpose(0, 1)
    fq = Float8FakeQuantizer(Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow()))
    y, ref = aq.fake_quant_fp8_rows(x), fq(x)
    assert y.stride() == ref.stride() == x.stride()
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    assert torch.equal(F.linear(y, w), F.linear(ref, w))


def test_cli_exports_a_converted_model_at_its_group_size(tmp_path):
    """The CLI's --group-size defaults to the model's QAT layers' (a pickled
    converted model at g=64 was refused under the old default 128)."""
    import subprocess
    import sys

    m = MLP()
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=head_filter)
    quantize_(m, AWQQATConfig(step="convert"), filter_fn=head_filter)
    torch.save(m, tmp_path / "m.pt")
    r = subprocess.run([sys.executable, "-m", "ao_awq_export", "export", str(tmp_path / "m.pt"), str(tmp_path / "o"),
                        "--allow-pickle", "--modules-to-not-convert", "head", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(tmp_path / "o" / "config.json"))["quantization_config"]["group_size"] == 64
    t = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.equal(t["a.qweight"], m.a.qweight) and "head.weight" in t


def test_prepare_leaves_weights_it_cannot_fake_quantize():
    """A reparametrized Linear (weight_norm, spectral_norm, pruning), a float64
    one: prepare leaves them as they are with a warning (it used to stop half
    way with a bare TypeError, or prepare a layer whose forward then failed)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 16).double())
    torch.nn.utils.parametrizations.weight_norm(m[1])
    with pytest.warns(UserWarning) as rec:
        quantize_(m, AWQQATConfig(group_size=32))
    text = " ".join(str(r.message) for r in rec)
    assert "reparametrized" in text and "torch.float64" in text
    assert isinstance(m[0], QATLinear) and not isinstance(m[1], QATLinear)
    assert type(m[2]) is nn.Linear
    x = torch.randn(3, 64)
    m[2](m[1](m[0](x)).double())  # every layer still runs


def test_convert_keeps_the_activation_fake_quants_ste():
    """ste='pure' (the gradient passes straight through the fp8 activation
    fake quant) survives convert: the input gradient is the same before and
    after (convert used to fall back to the autograd gradient, mostly zero)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 64))
    cfg = dict(scheme="fp8_int4", mode="awq", group_size=32, act_fake_quant=True)
    quantize_(m, AWQQATConfig(**cfg, ste="pure"))
    x = (torch.randn(4, 128) * 1e-3).requires_grad_()
    y = m(x)
    y.sum().backward()
    g_prepared = x.grad.clone()
    quantize_(m, AWQQATConfig(**cfg, ste="pure", step="convert"))
    assert isinstance(m[0], AWQInt4Linear) and m[0].ste == "pure" and "ste=pure" in repr(m[0])
    x.grad = None
    y2 = m(x)
    y2.sum().backward()
    assert torch.equal(y2, y) and torch.equal(x.grad, g_prepared)
    assert (g_prepared != 0).all()
    m2 = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m2, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False)[0].ste == "pure"


def test_swap_back_to_torchao_says_that_pure_ste_is_lost():
    m = nn.Sequential(nn.Linear(128, 64))
    quantize_(m, AWQQATConfig(scheme="int4_asym", mode="torchao", group_size=32, ste="pure"))
    with pytest.warns(UserWarning, match="trained with ste='pure'"):
        swap_ours_to_torchao_qat(m)
    assert isinstance(m[0], FakeQuantizedLinear)


def test_export_qat_awq_leaves_an_output_embedding_of_any_name_out_of_the_group_check(tmp_path):
    """export_awq keeps get_output_embeddings() in fp16 whatever its name, so
    export_qat_awq does not count its group size either."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 64)
            self.body = nn.Linear(64, 64)
            self.output = nn.Linear(64, 64, bias=False)

        def get_output_embeddings(self):
            return self.output

        def get_input_embeddings(self):
            return self.emb

    m = M()
    quantize_(m, AWQQATConfig(group_size=32), filter_fn=lambda mod, f: f == "body")
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=lambda mod, f: f == "output")
    rep = export_qat_awq(m, tmp_path / "o", progress=False)
    assert [l.name for l in rep.layers] == ["body"] and rep.group_size == 32
    t = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.equal(t["output.weight"], m.output.fake_quant_weight().detach().half())
