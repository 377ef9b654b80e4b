"""AWQ export (issue 4): format, exactness, sharding, atomicity, consumers.

Every file is opened with the real `safetensors.safe_open`; the AWQ words are
unpacked by code written here (not the project's), and `(q - z) * s` must
give back the fake-quant weight bit for bit in the exact modes.  Consumers:
AutoAWQ's own `dequantize_gemm`, and transformers' AWQ loader with the
GPTQModel torch kernel on a tiny Llama (subprocess).  Those two need the
packages below; they skip only outside CI when the packages are missing:
    transformers==5.23.0 accelerate==1.15.0
    gptqmodel==7.7.0 (--no-deps, + its import deps) autoawq==0.2.9 (--no-deps)
"""
import contextlib
import errno
import io
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

import ao_awq_export
from ao_awq_export import _C, export as ex
from ao_awq_export.export import FakeQuantLinear, export_awq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AWQ_SLOT = [0, 4, 1, 5, 2, 6, 3, 7]  # logical column j -> nibble index (SPEC section 5)
EXACT = [("int4_asym", "awq"), ("fp8_int4", "awq"), ("fp8_int4", "torchao")]


# ----------------------------------------------------------------------------
# independent readers
# ----------------------------------------------------------------------------
def unpack_awq_words(qw: torch.Tensor) -> np.ndarray:
    """int32 [R, C/8] -> codes [R, C], written from the SPEC: logical column j
    of each pack of 8 sits at bits 4*AWQ_SLOT[j]."""
    w = qw.numpy().view(np.uint32)
    r, c8 = w.shape
    out = np.empty((r, c8, 8), dtype=np.uint8)
    for j in range(8):
        out[:, :, j] = (w >> np.uint32(4 * AWQ_SLOT[j])) & np.uint32(0xF)
    return out.reshape(r, c8 * 8)


def raw_layout(path):
    """Parse a safetensors file by hand and check the container rules."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and n <= 100_000_000
    hdr_bytes = raw[8:8 + n]
    text = hdr_bytes.decode("utf-8")
    assert text == text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" ")))
    hdr = json.loads(text)
    assert hdr.pop("__metadata__") == {"format": "pt"}
    sizes = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I64": 8, "BOOL": 1}
    spans = []
    for name, e in hdr.items():
        b, en = e["data_offsets"]
        assert en - b == math.prod(e["shape"]) * sizes[e["dtype"]], name
        assert b % sizes[e["dtype"]] == 0, f"{name} misaligned"
        spans.append((b, en))
    spans.sort()
    pos = 0
    for b, en in spans:
        assert b == pos, "gap or overlap"
        pos = en
    assert len(raw) == 8 + n + pos, "trailing bytes"
    return hdr


def read_export(out_dir):
    """{name: tensor}, {name: file} reading every shard with safe_open."""
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    idx = os.path.join(out_dir, "model.safetensors.index.json")
    tensors, where = {}, {}
    for f in files:
        p = os.path.join(out_dir, f)
        raw_layout(p)
        with safe_open(p, framework="pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            for k in sf.keys():
                assert k not in tensors, f"{k} in two shards"
                tensors[k] = sf.get_tensor(k)
                where[k] = f
    if os.path.exists(idx):
        with open(idx) as fh:
            index = json.load(fh)
        assert index["weight_map"] == where
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values())
    else:
        assert files == ["model.safetensors"]
    return tensors, where


def awq_dequant(t, name, g, dtype):
    """D(fp32(q - z) * fp32(s)) from the file tensors of layer `name`."""
    q = torch.from_numpy(unpack_awq_words(t[f"{name}.qweight"])).T  # [N, K]
    z = torch.from_numpy(unpack_awq_words(t[f"{name}.qzeros"])).T  # [N, G]
    s = t[f"{name}.scales"].T  # [N, G]
    n, k = q.shape
    w = (q.float().view(n, -1, g) - z.float().unsqueeze(-1)) * s.float().unsqueeze(-1)
    return w.view(n, k).to(dtype)


def check_layer_format(t, name, n, k, g, bias):
    assert t[f"{name}.qweight"].dtype == torch.int32
    assert tuple(t[f"{name}.qweight"].shape) == (k, n // 8)
    assert t[f"{name}.qzeros"].dtype == torch.int32
    assert tuple(t[f"{name}.qzeros"].shape) == (k // g, n // 8)
    assert t[f"{name}.scales"].dtype == torch.float16
    assert tuple(t[f"{name}.scales"].shape) == (k // g, n)
    assert f"{name}.weight" not in t
    if bias:
        assert t[f"{name}.bias"].dtype == torch.float16 and tuple(t[f"{name}.bias"].shape) == (n,)
    else:
        assert f"{name}.bias" not in t


class Tiny(nn.Module):
    """embed -> 2 blocks of Linear -> lm_head tied to embed."""

    def __init__(self, d=128, h=256, vocab=96, dtype=torch.float32, lin=None, tie=True):
        super().__init__()
        lin = lin or (lambda i, o, b: nn.Linear(i, o, bias=b))
        self.embed_tokens = nn.Embedding(vocab, d)
        self.up = lin(d, h, True)
        self.down = lin(h, d, False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("step", torch.tensor([7], dtype=torch.int64))
        self.to(dtype)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        return self.lm_head(self.norm(self.down(torch.relu(self.up(x)))))


def fq_lin(scheme, mode, g):
    return lambda i, o, b: FakeQuantLinear(i, o, b, scheme=scheme, mode=mode, group_size=g)


@pytest.fixture
def outdir(tmp_path):
    return str(tmp_path / "awq")


def leftovers(parent):
    return sorted(os.listdir(parent))


# ----------------------------------------------------------------------------
# packing and the container
# ----------------------------------------------------------------------------
def test_pack_order_0x75316420():
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1)  # N=8 outputs, K=1
    word = ao_awq_export.pack_awq(codes)
    assert word.shape == (1, 1) and word.dtype == torch.int32
    assert int(word.item()) & 0xFFFFFFFF == 0x75316420
    assert unpack_awq_words(word).tolist() == [list(range(8))]
    # top nibble >= 8 gives a negative int32: expected
    w2 = ao_awq_export.pack_awq(torch.full((8, 1), 15, dtype=torch.uint8))
    assert int(w2.item()) == -1


@pytest.mark.parametrize("scheme,mode", EXACT)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_exact_modes_bit_for_bit(outdir, scheme, mode, dtype, g):
    torch.manual_seed(hash((scheme, mode, g)) % 1000)
    m = Tiny(dtype=dtype, lin=fq_lin(scheme, mode, g))
    with torch.no_grad():
        m.up.weight.mul_(torch.linspace(0.01, 3, 256, dtype=dtype).view(-1, 1))
    rep = export_awq(m, outdir, progress=False, group_size=g)
    t, _ = read_export(outdir)
    check_layer_format(t, "up", 256, 128, g, bias=True)
    check_layer_format(t, "down", 128, 256, g, bias=False)
    inexact_ok = scheme == "fp8_int4" and mode == "torchao" and dtype == torch.float32
    for name in ("up", "down"):
        mod = getattr(m, name)
        ref = mod.fake_quant_weight().detach()
        got = awq_dequant(t, name, g, dtype)
        lr = next(l for l in rep.layers if l.name == name)
        if inexact_ok:  # fp32 scale rounded to fp16: the only error (SPEC section 4)
            assert not lr.exact and lr.sqnr_db > 60
            assert torch.allclose(got, ref, rtol=2e-3, atol=0)
        else:
            assert torch.equal(got, ref), f"{scheme}/{mode} {name} not bit-exact"
            assert lr.exact and lr.sqnr_db == float("inf")
        if scheme == "fp8_int4":  # symmetric: plain z = 8 (not z - 1)
            assert (unpack_awq_words(t[f"{name}.qzeros"]) == 8).all()
    assert torch.equal(t["up.bias"], m.up.bias.detach().half())
    # unquantized tensors: fp16 .weight; tied embedding written once; int buffer kept
    assert t["embed_tokens.weight"].dtype == torch.float16
    assert torch.equal(t["embed_tokens.weight"], m.embed_tokens.weight.detach().half())
    assert "lm_head.weight" not in t and "lm_head.qweight" not in t
    assert t["norm.weight"].dtype == torch.float16 and t["step"].dtype == torch.int64
    cfg = json.load(open(os.path.join(outdir, "config.json")))
    assert cfg["torch_dtype"] == "float16"
    assert cfg["tie_word_embeddings"] is True  # lm_head.weight left out: the config says why
    assert cfg["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": None}


def test_rtn_plain_linear_excludes_and_config(outdir, tmp_path):
    torch.manual_seed(1)
    m = Tiny(dtype=torch.bfloat16, tie=False)
    m.extra = nn.Linear(128, 24)  # N % 8 == 0 but excluded by name
    m.down_fq = FakeQuantLinear(256, 128, scheme="int4_asym", mode="awq", group_size=64)
    m.down_fq.to(torch.bfloat16)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 128,
                                                "quantization_config": {"old": 1},
                                                "tie_word_embeddings": False}))
    (hf / "generation_config.json").write_text('{"max_new_tokens": 5}')
    rep = export_awq(m, outdir, scheme="int4_asym", mode="awq", group_size=64,
                     modules_to_not_convert=["extra", "down_fq"], hf_config=str(hf),
                     progress=False)
    t, _ = read_export(outdir)
    # RTN layers: the fake quant with the keyword args, exactly
    ref = ao_awq_export.fake_quant_int4_asym(m.up.weight.detach(), 64, mode="awq")
    assert torch.equal(awq_dequant(t, "up", 64, torch.bfloat16), ref)
    assert {l.name: l.source for l in rep.layers} == {"up": "rtn", "down": "rtn"}
    # excluded: fp16 .weight; the excluded FakeQuantLinear keeps its fake-quant weight
    assert t["extra.weight"].dtype == torch.float16 and "extra.qweight" not in t
    assert torch.equal(t["down_fq.weight"], m.down_fq.fake_quant_weight().detach().half())
    assert torch.equal(t["lm_head.weight"], m.lm_head.weight.detach().half())  # untied
    cfg = json.load(open(os.path.join(outdir, "config.json")))
    assert cfg["model_type"] == "tiny" and cfg["torch_dtype"] == "float16"
    assert cfg["tie_word_embeddings"] is False
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["extra", "down_fq"]
    assert "old" not in cfg["quantization_config"]
    assert json.load(open(os.path.join(outdir, "generation_config.json"))) == {"max_new_tokens": 5}
    assert sorted(os.listdir(outdir)) == ["config.json", "generation_config.json",
                                          "model.safetensors"]


def test_torchao_float_zero_is_reported_and_strict(tmp_path):
    torch.manual_seed(2)
    m = Tiny(dtype=torch.bfloat16, lin=fq_lin("int4_asym", "torchao", 128))
    rep = export_awq(m, str(tmp_path / "a"), progress=False)
    t, _ = read_export(str(tmp_path / "a"))
    for l in rep.layers:
        ref = getattr(m, l.name).fake_quant_weight().detach().double()
        got = awq_dequant(t, l.name, 128, torch.bfloat16).double()
        sqnr = 10 * math.log10(float((ref ** 2).sum() / ((got - ref) ** 2).sum()))
        assert not l.exact and abs(sqnr - l.sqnr_db) < 1e-6
        assert 19 < l.sqnr_db < 40
        # never worse than rounding the float zero to the nearest integer
        z = torch.from_numpy(unpack_awq_words(t[f"{l.name}.qzeros"])).T
        assert int(z.min()) >= 0 and int(z.max()) <= 15
    with pytest.raises(ValueError, match="SQNR"):
        export_awq(m, str(tmp_path / "b"), strict=True, progress=False)
    assert not (tmp_path / "b").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    rep = export_awq(m, str(tmp_path / "c"), strict=True, sqnr_threshold=15, progress=False)
    assert len(rep.layers) == 2


def test_sharding_and_index(outdir):
    torch.manual_seed(3)
    m = Tiny(dtype=torch.float16, lin=fq_lin("fp8_int4", "awq", 32))
    m.big = nn.Embedding(200, 128).half()  # 51,200 bytes: over the limit -> own shard
    rep = export_awq(m, outdir, max_shard_size="40KB", progress=False, group_size=32)
    t, where = read_export(outdir)
    files = sorted(set(where.values()))
    assert len(files) >= 3
    assert all(f == f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
               for i, f in enumerate(files))
    assert sum(1 for v in where.values() if v == where["big.weight"]) == 1
    for f in files:
        size = sum(t[k].numel() * t[k].element_size() for k in t if where[k] == f)
        assert size <= 40_000 or f == where["big.weight"]
    # a quantized layer's tensors stay together
    assert where["up.qweight"] == where["up.qzeros"] == where["up.scales"] == where["up.bias"]
    assert rep.files[-2:] == ["model.safetensors.index.json", "config.json"]
    ref = m.up.fake_quant_weight().detach()
    assert torch.equal(awq_dequant(t, "up", 32, torch.float16), ref)


def test_hostile_module_names(outdir):
    names = ['q"uote', "back\\slash", "ünï€😀", "tab\tnl\n\x01"]
    m = nn.Module()
    for i, n in enumerate(names):
        m.add_module(n, nn.Linear(64, 16, bias=True))
    m.add_module('fp"16\\ü', nn.Linear(64, 16))
    rep = export_awq(m, outdir, group_size=32, modules_to_not_convert=['fp"16\\ü'],
                     progress=False)
    t, _ = read_export(outdir)
    for n in names:
        check_layer_format(t, n, 16, 64, 32, bias=True)
        ref = ao_awq_export.fake_quant_int4_asym(getattr(m, n).weight.detach(), 32, mode="awq")
        assert torch.equal(awq_dequant(t, n, 32, torch.float32), ref)
    assert 'fp"16\\ü.weight' in t
    cfg = json.load(open(os.path.join(outdir, "config.json"), encoding="utf-8"))
    assert cfg["quantization_config"]["modules_to_not_convert"] == ['fp"16\\ü']
    assert len(rep.layers) == 4


def test_int4_tensor_weights(outdir):
    """A Linear holding a torchao Int4Tensor (what quantize_(Int4WeightOnlyConfig())
    produces on CUDA; on CPU it needs mslk, so it is built here from the same
    numerics: plain packing, low nibble = even column, scale/zero [K/g, N])."""
    from torchao.quantization import Int4Tensor

    torch.manual_seed(4)
    lin = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    w = lin.weight.detach()
    codes, scale, zero = ao_awq_export.quantize_int4(w, 128, scheme="int4_asym", mode="torchao")
    signed = codes.to(torch.int16) - 8
    lo, hi = signed[:, 0::2] & 0xF, signed[:, 1::2] & 0xF
    qdata = (lo | (hi << 4)).to(torch.uint8).view(torch.int8)
    it = Int4Tensor(qdata, scale.t().contiguous().to(torch.bfloat16),
                    zero.t().contiguous().to(torch.bfloat16), [1, 128], w.shape)
    lin.weight = nn.Parameter(it, requires_grad=False)
    m = nn.Sequential(lin)
    rep = export_awq(m, outdir, progress=False)
    (l,) = rep.layers
    assert l.source == "int4_tensor" and not l.exact and l.sqnr_db > 19
    t, _ = read_export(outdir)
    check_layer_format(t, "0", 64, 256, 128, bias=False)
    ref = (signed.float().view(64, -1, 128) * scale.to(torch.bfloat16).float().unsqueeze(-1)
           + zero.to(torch.bfloat16).float().unsqueeze(-1)).view(64, 256)
    got = awq_dequant(t, "0", 128, torch.float32)
    sqnr = 10 * math.log10(float((ref ** 2).sum() / ((got - ref) ** 2).sum()))
    assert sqnr > 19


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------
def test_bad_shapes_and_group_sizes(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="multiple of 8"):
        export_awq(nn.Sequential(nn.Linear(64, 12)), out, group_size=32, progress=False)
    with pytest.raises(ValueError, match="multiple of the group"):
        export_awq(nn.Sequential(nn.Linear(96, 16)), out, group_size=64, progress=False)
    for g in (16, 256, -1):
        with pytest.raises(ValueError, match="group_size"):
            export_awq(nn.Sequential(nn.Linear(256, 16)), out, group_size=g, progress=False)
    fq = nn.Sequential(FakeQuantLinear(256, 16, scheme="int4_asym", mode="awq", group_size=256))
    with pytest.raises(ValueError, match="group size 256"):
        export_awq(fq, out, progress=False)
    mixed = nn.Sequential(FakeQuantLinear(128, 16, group_size=32),
                          FakeQuantLinear(128, 16, group_size=64))
    with pytest.raises(ValueError, match="one group size"):
        export_awq(mixed, out, progress=False)
    big = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():
        big[0].weight.uniform_(-4e6, 4e6)  # group range / 15 > 65504
    with pytest.raises(ValueError, match="float16"):
        export_awq(big, out, group_size=32, progress=False)
    clash = nn.Module()
    clash.add_module("a", nn.Linear(64, 16))
    clash.add_module("ab", nn.Linear(64, 16))
    clash.add_module("c", nn.Linear(64, 16))
    # substring match, as AutoAWQ / vLLM read modules_to_not_convert: "a" skips "ab" too
    rep = export_awq(clash, out, group_size=32, modules_to_not_convert=["a"], progress=False)
    assert [l.name for l in rep.layers] == ["c"] and rep.modules_to_not_convert == ["a", "ab"]
    shutil.rmtree(out)
    with pytest.raises(ValueError, match="max_shard_size|parse"):
        export_awq(nn.Sequential(nn.Linear(64, 16)), out, max_shard_size="5 parsecs")
    assert os.listdir(tmp_path) == []


def test_out_dir_rules(tmp_path):
    m = nn.Sequential(nn.Linear(64, 16))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_awq(m, str(full), group_size=32, progress=False)
    assert os.listdir(full) == ["keep.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError):
        export_awq(m, str(tmp_path / "afile"), group_size=32, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_awq(m, str(empty), group_size=32, progress=False)  # an empty dir is fine
    assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["afile", "empty", "full"]


def _run(code, *, prefix=(), timeout=180):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(list(prefix) + [sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_non_writable_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    prefix = ()
    if os.geteuid() == 0:  # root ignores permissions unless DAC override is dropped
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test as root"
        prefix = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search", "--")
    try:
        r = _run(f"""
            import torch.nn as nn
            from ao_awq_export.export import export_awq
            try:
                export_awq(nn.Sequential(nn.Linear(64, 16)), {str(ro / 'out')!r},
                           group_size=32, progress=False)
            except PermissionError as e:
                print("PermissionError", e)
            """, prefix=prefix)
        assert "PermissionError" in r.stdout and "parent directory" in r.stdout, r.stdout + r.stderr
        assert os.listdir(ro) == []
        # an empty, writable out_dir in that parent: written from inside it
        os.chmod(ro, 0o755)
        (ro / "vol").mkdir(mode=0o777)
        os.chmod(ro / "vol", 0o777)
        os.chmod(ro, 0o555)
        r = _run(f"""
            import torch.nn as nn
            from ao_awq_export.export import export_awq
            export_awq(nn.Sequential(nn.Linear(64, 16)), {str(ro / 'vol')!r}, group_size=32,
                       progress=False)
            print("ok")
            """, prefix=prefix)
        assert r.stdout.strip() == "ok", r.stdout + r.stderr
        assert sorted(os.listdir(ro / "vol")) == ["config.json", "model.safetensors"]
        assert os.listdir(ro) == ["vol"]
    finally:
        os.chmod(ro, 0o755)


def test_write_failure_mid_shard_rlimit(tmp_path):
    """A real EFBIG from RLIMIT_FSIZE in the middle of a shard: OSError naming
    the tensor and the file, nothing left (no out_dir, no temporaries)."""
    out = tmp_path / "out"
    r = _run(f"""
        import errno, resource, torch, torch.nn as nn
        from ao_awq_export.export import export_awq
        torch.manual_seed(0)
        m = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])  # ~0.4 MB of tensors
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
        try:
            export_awq(m, {str(out)!r}, group_size=64, progress=False)
        except OSError as e:
            print("ERRNO", e.errno == errno.EFBIG, e)
        """)
    assert "ERRNO True" in r.stdout, r.stdout + r.stderr
    assert "writing tensor" in r.stdout and "model.safetensors" in r.stdout
    assert os.listdir(tmp_path) == []


def test_write_failure_injected_enospc(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    calls = []

    def hook(handle, fname):
        calls.append(fname)
        if len(calls) == 2:  # second shard: disk full after 1000 bytes
            _C.st_inject_fault(handle, 1000, errno.ENOSPC)

    monkeypatch.setattr(ex, "_writer_hook", hook)
    m = Tiny(lin=fq_lin("int4_asym", "awq", 32))
    with pytest.raises(OSError) as ei:
        export_awq(m, out, group_size=32, max_shard_size="20KB", progress=False)
    assert ei.value.errno == errno.ENOSPC and "writing tensor" in str(ei.value)
    assert len(calls) == 2 and os.listdir(tmp_path) == []


def test_failure_in_quantization_leaves_nothing(tmp_path, monkeypatch):
    real = ex._quantize_int4
    n = {"i": 0}

    def flaky(*a, **k):
        n["i"] += 1
        if n["i"] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(ex, "_quantize_int4", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        export_awq(Tiny(), str(tmp_path / "o"), group_size=32, progress=False)
    assert os.listdir(tmp_path) == []
    # parent directories the export created are removed again, existing ones kept
    os.mkdir(tmp_path / "keep")
    n["i"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        export_awq(Tiny(), str(tmp_path / "keep" / "a" / "b" / "o"), group_size=32,
                   progress=False)
    assert os.listdir(tmp_path) == ["keep"] and os.listdir(tmp_path / "keep") == []


# ----------------------------------------------------------------------------
# the C writer directly
# ----------------------------------------------------------------------------
def test_st_writer_api(tmp_path):
    p = str(tmp_path / "x.safetensors")
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    b = np.arange(5, dtype=np.int32)
    h = _C.st_open(p, [("a", "F16", [2, 3]), ("b", "I32", [5]), ("c", "U8", [0])])
    info = _C.st_info(h)
    assert info["header_size"] % 8 == 0 and [s[0] for s in info["slots"]] == [1, 0, 2]
    _C.st_write(h, 0, a[:1])  # chunked writes
    _C.st_write(h, 0, a[1:])
    with pytest.raises(ValueError, match="remain"):
        _C.st_write(h, 0, a)
    _C.st_write(h, 1, b.ctypes.data, b.nbytes)
    assert not os.path.exists(p) and os.path.exists(info["temp_path"])
    assert _C.st_close(h) == os.path.getsize(p)
    with safe_open(p, "np") as f:
        assert (f.get_tensor("a") == a).all() and (f.get_tensor("b") == b).all()
        assert f.get_tensor("c").shape == (0,)
    with pytest.raises(ValueError, match="closed"):
        _C.st_write(h, 0, a)
    # existing final file: refused, untouched
    with pytest.raises(FileExistsError):
        _C.st_open(p, [("a", "F16", [1])])
    # incomplete -> ValueError, nothing under the final name, no temporary
    q = str(tmp_path / "y.safetensors")
    h = _C.st_open(q, [("a", "F16", [2, 3])])
    _C.st_write(h, 0, a[:1])
    with pytest.raises(ValueError, match="incomplete"):
        _C.st_close(h)
    for bad, msg in ([("a", "F16", [1]), ("a", "F16", [1])], "duplicate"), \
                    ([("__metadata__", "F16", [1])], "metadata"), \
                    ([("a", "Q4", [1])], "dtype"), ([("a", "F16", [-1])], "negative"), \
                    ([("", "F16", [1])], "empty"):
        with pytest.raises(ValueError, match=msg):
            _C.st_open(q, bad)
    # abort and garbage collection remove the temporary file
    h = _C.st_open(q, [("a", "F16", [1])])
    tmp = _C.st_info(h)["temp_path"]
    _C.st_abort(h)
    _C.st_abort(h)
    assert not os.path.exists(tmp)
    h = _C.st_open(q, [("a", "F16", [1])])
    tmp = _C.st_info(h)["temp_path"]
    del h
    assert not os.path.exists(tmp)
    with pytest.raises(FileNotFoundError):
        _C.st_open(str(tmp_path / "nodir" / "z.safetensors"), [])
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]


# ----------------------------------------------------------------------------
# consumers
# ----------------------------------------------------------------------------
def _need(mod):
    if importlib.util.find_spec(mod) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{mod} is required in CI (see the module docstring for pins)")
        pytest.skip(f"{mod} not installed")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_autoawq_dequantize_and_packer(outdir):
    """AutoAWQ's own unpack/reorder/dequantize (awq.utils.packing_utils,
    autoawq 0.2.9) on our files == the fake-quant weight (fp16 model), and its
    own packer (WQLinear_GEMM.from_linear) given the same weight, scales and
    zeros produces our qweight/qzeros words."""
    _need("awq")
    with contextlib.redirect_stderr(io.StringIO()):  # AutoAWQ's deprecation banner
        from awq.modules.linear.gemm import WQLinear_GEMM
        from awq.utils.packing_utils import dequantize_gemm
    torch.manual_seed(5)
    m = Tiny(dtype=torch.float16, lin=fq_lin("int4_asym", "awq", 64))
    m.up2 = FakeQuantLinear(128, 64, scheme="fp8_int4", mode="awq", group_size=64).half()
    export_awq(m, outdir, progress=False, group_size=64)
    t, _ = read_export(outdir)
    for name in ("up", "down", "up2"):
        w = dequantize_gemm(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"], 4, 64)
        assert w.dtype == torch.float16
        assert torch.equal(w.T, getattr(m, name).fake_quant_weight().detach())
    lin = nn.Linear(128, 256, bias=True).half()
    with torch.no_grad():
        lin.weight.copy_(m.up.fake_quant_weight())
        lin.bias.copy_(m.up.bias)
    zeros = torch.from_numpy(unpack_awq_words(t["up.qzeros"])).to(torch.float16)  # [G, N]
    ref = WQLinear_GEMM.from_linear(lin, 4, 64, scales=t["up.scales"], zeros=zeros)
    assert torch.equal(ref.qweight, t["up.qweight"]) and torch.equal(ref.qzeros, t["up.qzeros"])
    assert torch.equal(ref.scales, t["up.scales"]) and torch.equal(ref.bias, t["up.bias"])


def test_transformers_gptqmodel_llama_cpu(tmp_path):
    """transformers' AWQ loader (-> GPTQModel AwqTorchLinear, pure torch, CPU)
    loads the export of a tiny Llama; logits match the fake-quant model."""
    _need("transformers")
    _need("gptqmodel")
    r = _run(f"""
        import json, torch, torch.nn as nn
        from transformers import AutoModelForCausalLM, AwqConfig, LlamaConfig, LlamaForCausalLM
        from ao_awq_export.export import FakeQuantLinear, export_awq
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=True)
        m = LlamaForCausalLM(cfg).eval()
        for name, mod in list(m.named_modules()):
            for cn, c in list(mod.named_children()):
                if isinstance(c, nn.Linear) and cn != "lm_head":
                    setattr(mod, cn, FakeQuantLinear.from_linear(
                        c, scheme="int4_asym" if "mlp" in name else "fp8_int4", mode="awq",
                        group_size=32))
        m = m.half()
        out = {str(tmp_path / 'awq')!r}
        rep = export_awq(m, out, group_size=32, progress=False)
        assert rep.all_exact and len(rep.layers) == 14
        ids = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            ref = m(ids).logits.float()
        q = AutoModelForCausalLM.from_pretrained(
            out, device_map="cpu", dtype=torch.float16,
            quantization_config=AwqConfig(bits=4, group_size=32, backend="torch_awq"))
        kern = type(q.model.layers[0].self_attn.q_proj).__name__
        with torch.no_grad():
            got = q(ids).logits.float()
        print("RESULT", kern, float((got - ref).abs().max()), float(ref.abs().max()))
        """, timeout=300)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    _, kern, diff, scale = line[0].split()
    assert kern == "AwqTorchLinear"
    assert float(diff) <= 2e-3 * max(1.0, float(scale)), line


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def test_cli_state_dict_and_pickled_model(tmp_path):
    _need("transformers")
    r = _run(f"""
        import torch, torch.nn as nn
        from transformers import LlamaConfig, LlamaForCausalLM
        from ao_awq_export.export import FakeQuantLinear
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        m = LlamaForCausalLM(cfg)
        cfg.save_pretrained({str(tmp_path / 'hf')!r})
        torch.save(m.state_dict(), {str(tmp_path / 'sd.pt')!r})
        m.model.layers[0].mlp.up_proj = FakeQuantLinear.from_linear(
            m.model.layers[0].mlp.up_proj, scheme="fp8_int4", mode="awq", group_size=32)
        torch.save(m, {str(tmp_path / 'model.pt')!r})
        """)
    assert r.returncode == 0, r.stderr
    cli = [sys.executable, "-m", "ao_awq_export", "export"]
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run(cli + [str(tmp_path / "sd.pt"), str(tmp_path / "o1"), "--hf-config",
                              str(tmp_path / "hf"), "--group-size", "32", "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "7 quantized layers (7 bit-exact)" in r.stdout
    t, _ = read_export(str(tmp_path / "o1"))
    sd = torch.load(str(tmp_path / "sd.pt"))
    w = sd["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(awq_dequant(t, "model.layers.0.self_attn.q_proj", 32, torch.float32),
                       ao_awq_export.fake_quant_int4_asym(w, 32, mode="awq"))
    cfg = json.load(open(tmp_path / "o1" / "config.json"))
    assert cfg["model_type"] == "llama" and cfg["quantization_config"]["group_size"] == 32
    # a pickled model needs --allow-pickle; FakeQuantLinear keeps its own scheme
    r = subprocess.run(cli + [str(tmp_path / "model.pt"), str(tmp_path / "o2"), "--group-size",
                              "32", "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert r.returncode == 1 and "--allow-pickle" in r.stderr
    assert not (tmp_path / "o2").exists()
    r = subprocess.run(cli + [str(tmp_path / "model.pt"), str(tmp_path / "o2"), "--group-size",
                              "32", "--no-progress", "--allow-pickle",
                              "--max-shard-size", "20KB"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr
    t, _ = read_export(str(tmp_path / "o2"))
    assert os.path.exists(tmp_path / "o2" / "model.safetensors.index.json")
    z = unpack_awq_words(t["model.layers.0.mlp.up_proj.qzeros"])
    assert (z == 8).all()  # fp8_int4 layer
    # existing non-empty out_dir -> exit 1, message on stderr
    r = subprocess.run(cli + [str(tmp_path / "sd.pt"), str(tmp_path / "o1"), "--hf-config",
                              str(tmp_path / "hf"), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert r.returncode == 1 and "not empty" in r.stderr


def test_cli_exports_a_model_directory(tmp_path, capsys):
    """A QAT model saved with save_pretrained (what a Trainer checkpoint holds:
    float weights under the usual names, sharded) exports from its directory,
    read by transformers, to the same tensors as export_qat_awq of the model;
    its tokenizer files come along; what cannot be the trained model is refused."""
    _need("transformers")
    from safetensors.torch import save_file
    from torchao.quantization import quantize_
    from transformers import LlamaConfig, LlamaForCausalLM

    from ao_awq_export.__main__ import main
    from ao_awq_export.qat import AWQQATConfig, awq_filter, export_qat_awq

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    quantize_(m, AWQQATConfig(scheme="int4_asym", mode="awq", group_size=32), filter_fn=awq_filter)
    ck = tmp_path / "checkpoint-100"
    m.save_pretrained(str(ck), max_shard_size="100KB")
    assert (ck / "model.safetensors.index.json").exists()
    (ck / "tokenizer.json").write_bytes(b'{"tok": 1}')
    export_qat_awq(m, str(tmp_path / "ref"), progress=False)
    ref, _ = read_export(str(tmp_path / "ref"))

    flags = ["--scheme", "int4_asym", "--mode", "awq", "--group-size", "32", "--no-progress"]
    assert main(["export", str(ck), str(tmp_path / "o1")] + flags) == 0
    cap = capsys.readouterr()
    assert "note:" not in cap.err and "14 quantized layers (14 bit-exact)" in cap.out
    got, _ = read_export(str(tmp_path / "o1"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert (tmp_path / "o1" / "tokenizer.json").read_bytes() == b'{"tok": 1}'
    out_cfg = json.load(open(tmp_path / "o1" / "config.json"))
    assert out_cfg["model_type"] == "llama" and out_cfg["quantization_config"]["group_size"] == 32

    # without the training's settings: exported (RTN at the defaults), with a note saying so
    assert main(["export", str(ck), str(tmp_path / "o2"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "--scheme, --mode, --group-size" in err and "group size 128" in err
    assert json.load(open(tmp_path / "o2" / "config.json"))["quantization_config"][
        "group_size"] == 128

    def refused(src, what):
        out = tmp_path / f"x{len(os.listdir(tmp_path))}"
        assert main(["export", str(src), str(out)] + flags) == 1
        err = capsys.readouterr().err
        assert re.search(what, err), err
        assert not out.exists()

    # an AWQ export is not a model to quantize
    refused(tmp_path / "o1", r"quantization_config \(quant_method 'awq'\).*quantized model")
    # no config.json
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.safetensors").write_bytes(b"")
    refused(tmp_path / "bare", "needs its config.json")
    # a weight missing: transformers would initialise it at random
    part = tmp_path / "part"
    m2 = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m2.save_pretrained(str(part))
    sd = load_file(str(part / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(part / "model.safetensors"), metadata={"format": "pt"})
    refused(part, r"does not match.*missing keys: \['model\.layers\.1\.mlp\.up_proj\.weight'\]")
    # a converted model's checkpoint holds qweight/qzeros the float model has no place for
    quantize_(m, AWQQATConfig(step="convert"), filter_fn=awq_filter)
    m.save_pretrained(str(tmp_path / "converted"))
    refused(tmp_path / "converted", "holds AWQ tensors")


def test_cli_model_directory_dtypes_bin_remote_code_and_dropped_tensors(tmp_path, capsys,
                                                                         monkeypatch):
    """Each tensor is read in the dtype it is stored in (a pytorch_model.bin
    too, fp32 norms beside bf16 weights), whatever config.json's dtype says;
    remote code is never run; tensors the class drops on load, and unreadable
    weight files, are refused naming them."""
    _need("transformers")
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ao_awq_export.__main__ import main

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg)
    flags = ["--scheme", "int4_asym", "--mode", "awq", "--group-size", "32", "--no-progress"]

    def export_dir(d, name):
        rc = main(["export", str(d), str(tmp_path / name)] + flags)
        err = capsys.readouterr().err
        return rc, err, (read_export(str(tmp_path / name))[0] if rc == 0 else None)

    def set_config_dtype(d, dt):
        c = json.load(open(d / "config.json"))
        c["dtype"] = dt
        (d / "config.json").write_text(json.dumps(c))

    # fp32 weights in a pytorch_model.bin, a config saying bfloat16
    export_awq(m, str(tmp_path / "ref32"), scheme="int4_asym", mode="awq", group_size=32,
               progress=False)
    ref32, _ = read_export(str(tmp_path / "ref32"))
    b = tmp_path / "bin"
    b.mkdir()
    m.config.save_pretrained(str(b))
    torch.save(m.state_dict(), str(b / "pytorch_model.bin"))
    set_config_dtype(b, "bfloat16")
    rc, err, got = export_dir(b, "o_bin")
    assert rc == 0, err
    assert got.keys() == ref32.keys() and all(torch.equal(got[k], ref32[k]) for k in ref32)

    # bf16 weights, fp32 norms, a config saying float32: the weights quantized in
    # bf16, the norms rounded once (fp32 -> fp16), as stored
    mixed = {k: (v.clone() if v.dim() == 1 else v.to(torch.bfloat16)) for k, v in
             m.state_dict().items()}
    mx = tmp_path / "mixed"
    m.config.save_pretrained(str(mx))
    save_file(mixed, str(mx / "model.safetensors"), metadata={"format": "pt"})
    set_config_dtype(mx, "float32")
    rc, err, got = export_dir(mx, "o_mixed")
    assert rc == 0, err
    m16 = LlamaForCausalLM(cfg)
    m16.load_state_dict(mixed, assign=True)
    assert m16.model.norm.weight.dtype == torch.float32
    export_awq(m16, str(tmp_path / "ref_mixed"), scheme="int4_asym", mode="awq", group_size=32,
               progress=False)
    ref, _ = read_export(str(tmp_path / "ref_mixed"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert torch.equal(got["model.norm.weight"], mixed["model.norm.weight"].half())

    # the same with config.json saying tied but a head of its own (transformers then
    # leaves them untied): putting the norms back must not tie the head again
    cfg_t = json.load(open(mx / "config.json"))
    cfg_t["tie_word_embeddings"] = True
    (mx / "config.json").write_text(json.dumps(cfg_t))
    rc, err, got = export_dir(mx, "o_mixed_tied")
    assert rc == 0, err
    assert torch.equal(got["lm_head.weight"], mixed["lm_head.weight"].half())
    assert json.load(open(tmp_path / "o_mixed_tied" / "config.json"))[
        "tie_word_embeddings"] is False
    # a legacy (non-zip) pytorch_model.bin, which cannot be memory-mapped
    old = tmp_path / "oldbin"
    m.config.save_pretrained(str(old))
    torch.save(m.state_dict(), str(old / "pytorch_model.bin"),
               _use_new_zipfile_serialization=False)
    rc, err, got = export_dir(old, "o_oldbin")
    assert rc == 0, err
    assert all(torch.equal(got[k], ref32[k]) for k in ref32)

    # an ignore pattern that matches tensors the model has (GLM-4.5's model.layers.46
    # in a deeper model) does not refuse them: only keys the model lacks are dropped
    monkeypatch.setattr(LlamaForCausalLM, "_keys_to_ignore_on_load_unexpected",
                        [r"model\.layers\.0.*", r"^mtp\."], raising=False)
    rc, err, got = export_dir(b, "o_pattern")
    assert rc == 0, err
    # tensors the class drops on load without a word (here made so by its ignore list)
    dr = tmp_path / "dropped"
    m.save_pretrained(str(dr))
    sd = load_file(str(dr / "model.safetensors"))
    sd["mtp.proj.weight"] = torch.ones(4, 4)
    save_file(sd, str(dr / "model.safetensors"), metadata={"format": "pt"})
    rc, err, _ = export_dir(dr, "o_dropped")
    assert rc == 1 and "does not load 1 of its tensors (e.g. ['mtp.proj.weight'])" in err, err
    assert not (tmp_path / "o_dropped").exists()
    monkeypatch.undo()

    # a remote-code model: refused at once, its code never run (no prompt either)
    rcd = tmp_path / "remote"
    rcd.mkdir()
    marker = tmp_path / "CODE_RAN"
    (rcd / "configuration_my.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class MyConfig(PretrainedConfig):\n    model_type = 'my_remote'\n")
    (rcd / "config.json").write_text(json.dumps(
        {"model_type": "my_remote", "architectures": ["MyModel"],
         "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                      "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\n"))
    rc, err, _ = export_dir(rcd, "o_remote")
    assert rc == 1 and "remote-code model" in err and "--allow-pickle" in err, err
    assert not marker.exists()

    # saved twice into one directory (single file, then shards): which is stale is unknown
    twice = tmp_path / "twice"
    m.save_pretrained(str(twice))
    m.save_pretrained(str(twice), max_shard_size="20KB")
    assert {"model.safetensors", "model.safetensors.index.json"} <= set(os.listdir(twice))
    rc, err, _ = export_dir(twice, "o_twice")
    assert rc == 1 and "holds both model.safetensors and model.safetensors.index.json" in err, err
    # a weight the class lets go missing (its _keys_to_ignore_on_load_missing)
    monkeypatch.setattr(LlamaForCausalLM, "_keys_to_ignore_on_load_missing", [r"mlp\.up_proj"],
                        raising=False)
    gone = tmp_path / "gone"
    m.save_pretrained(str(gone))
    sd = load_file(str(gone / "model.safetensors"))
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, str(gone / "model.safetensors"), metadata={"format": "pt"})
    rc, err, _ = export_dir(gone, "o_gone")
    assert rc == 1 and "does not hold ['model.layers.0.mlp.up_proj.weight']" in err, err
    monkeypatch.undo()
    # an invalid config.json (transformers' own validation) is an error naming the directory
    inval = tmp_path / "inval"
    m.save_pretrained(str(inval))
    c = json.load(open(inval / "config.json"))
    c["num_attention_heads"] = 3
    (inval / "config.json").write_text(json.dumps(c))
    rc, err, _ = export_dir(inval, "o_inval")
    assert rc == 1 and f"{inval}: transformers cannot load it" in err, err
    # an unreadable shard is named
    bad = tmp_path / "badshard"
    m.save_pretrained(str(bad), max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(bad) if f.startswith("model-0"))[0]
    (bad / shard).write_bytes(b"\xff" * 16)
    rc, err, _ = export_dir(bad, "o_bad")
    assert rc == 1 and f"{shard}: cannot read it as safetensors" in err, err


# ----------------------------------------------------------------------------
# models the export must refuse or handle (review of the export path)
# ----------------------------------------------------------------------------
def test_refuses_models_with_nothing_or_unsupported_to_quantize(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="no Linear layer to quantize"):
        export_awq(nn.Sequential(nn.LayerNorm(64)), out, progress=False)
    only_excluded = nn.Module()
    only_excluded.add_module("lm_head", nn.Linear(64, 16))
    with pytest.raises(ValueError, match="no Linear layer to quantize"):
        export_awq(only_excluded, out, group_size=32, progress=False)
    _need("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=1,
                                      n_head=2))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn: transformers Conv1D"):
        export_awq(gpt2, out, group_size=32, progress=False)
    # transformers >= 5 fuses MoE experts into 3-D tensors saved under other names
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2))
    if any(p.dim() == 3 for p in moe.parameters()):
        with pytest.raises(ValueError, match="fused MoE experts"):
            export_awq(moe, out, group_size=32, progress=False)
    # fused expert stacks stored as such (gpt-oss style): refused unless excluded
    class GptOssExperts(nn.Module):
        pass

    experts = GptOssExperts()
    experts.gate_up_proj = nn.Parameter(torch.randn(4, 64, 128))
    m = nn.Module()
    m.add_module("q", nn.Linear(64, 16))
    m.add_module("experts", experts)
    m.add_module("conv", nn.Conv1d(4, 8, 3))  # convolutions are plain fp16 tensors
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj: a 3-D weight"):
        export_awq(m, out, group_size=32, progress=False)
    assert os.listdir(tmp_path) == []
    export_awq(m, out, group_size=32, progress=False, modules_to_not_convert=["experts"])
    t, _ = read_export(out)
    assert t["experts.gate_up_proj"].dtype == torch.float16 and "conv.weight" in t
    # a 3-D weight outside expert modules (RecurrentGemma's gates): written, not refused
    gates = nn.Module()
    gates.input_gate_weight = nn.Parameter(torch.randn(4, 8, 8))
    m2 = nn.Module()
    m2.add_module("q", nn.Linear(64, 16))
    m2.add_module("rg_lru", gates)
    export_awq(m2, str(tmp_path / "o2"), group_size=32, progress=False)
    t, _ = read_export(str(tmp_path / "o2"))
    assert t["rg_lru.input_gate_weight"].shape == (4, 8, 8)
    shutil.rmtree(tmp_path / "o2")


def test_partial_exclusion_of_a_fused_layer_and_patterns(tmp_path, caplog):
    blk = nn.Module()
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        blk.add_module(n, nn.Linear(64, 16))
    m = nn.Module()
    m.add_module("attn", blk)
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match=r"attn: \['q_proj'\] would stay float16 while "
                                         r"\['k_proj', 'v_proj'\] are quantized"):
        export_awq(m, out, group_size=32, modules_to_not_convert=["q_proj"], progress=False)
    with pytest.raises(ValueError, match="empty pattern"):
        export_awq(m, out, group_size=32, modules_to_not_convert=[" "], progress=False)
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        rep = export_awq(m, out, group_size=32, progress=False,
                         modules_to_not_convert=[" o_proj", "no_such_layer"])
    assert rep.modules_to_not_convert == ["attn.o_proj"]
    assert "no_such_layer" in caplog.text
    with pytest.raises(ValueError, match="sqnr_threshold"):
        export_awq(m, str(tmp_path / "o2"), group_size=32, sqnr_threshold=float("nan"))


def test_names_that_are_not_utf8_are_refused(tmp_path):
    m = nn.ModuleDict({"x\udc80": nn.Linear(128, 16)})
    with pytest.raises(ValueError, match="a tensor name must be valid UTF-8"):
        export_awq(m, str(tmp_path / "o"), group_size=32, progress=False)
    assert leftovers(tmp_path) == []
    assert _C.st_dtype_size("F16") == 2 and _C.st_dtype_size("F16\x00x") == 0


def test_aliased_linear_is_written_under_every_name(outdir):
    m = nn.Module()
    m.add_module("a", nn.Linear(64, 16))
    m.add_module("b", m.a)  # one module, two names: state_dict has both
    torch.manual_seed(0)
    rep = export_awq(m, outdir, group_size=32, progress=False)
    assert sorted(l.name for l in rep.layers) == ["a", "b"]
    t, _ = read_export(outdir)
    for k in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(t[f"a.{k}"], t[f"b.{k}"]), k
    assert "b.weight" not in t
    assert torch.equal(awq_dequant(t, "b", 32, torch.float32),
                       ao_awq_export.fake_quant_int4_asym(m.a.weight.detach(), 32, mode="awq"))


def test_empty_tensors_are_not_tied_and_non_finite_tensors_refused(tmp_path):
    m = nn.Sequential(nn.Linear(64, 16))
    m.register_buffer("a", torch.empty(0))
    m.register_buffer("b", torch.empty(0))
    out = str(tmp_path / "o")
    export_awq(m, out, group_size=32, progress=False)
    t, _ = read_export(out)
    assert {"a", "b"} <= set(t) and t["a"].numel() == t["b"].numel() == 0
    for bad, what in ((float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"),
                      (1e6, "float16 range")):
        for target in ("bias", "emb"):
            m = nn.Sequential(nn.Linear(64, 16), nn.Embedding(4, 8))
            with torch.no_grad():
                (m[0].bias if target == "bias" else m[1].weight)[1] = bad
            name = "0.bias" if target == "bias" else "1.weight"
            with pytest.raises(ValueError, match=rf"^{re.escape(name)}: .*{what}"):
                export_awq(m, str(tmp_path / "bad"), group_size=32, progress=False)
    # quantized-layer errors name the tensor
    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    with torch.no_grad():
        m[1].weight[0, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^1\.weight: contains NaN or Inf \(first at \[0, 5\]\)"):
        export_awq(m, str(tmp_path / "bad"), group_size=32, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_generation_config_comes_from_the_model(tmp_path):
    _need("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2))
    m.generation_config.eos_token_id = [1, 7]
    out = str(tmp_path / "o")
    export_awq(m, out, group_size=32, progress=False)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == [1, 7]


def test_st_open_reads_each_shape_once(tmp_path):
    class Shifty:  # len() 1 first, then huge: must not be trusted twice
        n = 0

        def __len__(self):
            Shifty.n += 1
            return 1 if Shifty.n == 1 else 100000

        def __getitem__(self, i):
            if i >= len(self):
                raise IndexError
            return 4

        def __iter__(self):
            return iter([4])

    p = str(tmp_path / "x.safetensors")
    try:
        h = _C.st_open(p, [("a", "U8", Shifty())])
    except (TypeError, ValueError):
        return
    z = torch.zeros(4, dtype=torch.uint8)  # alive during the write (a raw address)
    _C.st_write(h, 0, z.data_ptr(), 4)
    _C.st_close(h)
    with safe_open(p, "pt") as f:
        assert list(f.get_tensor("a").shape) == [4]


def test_st_open_keeps_foreign_errors_and_checks_sizes(tmp_path):
    p = str(tmp_path / "x.safetensors")

    def entries():
        yield ("a", "F32", [1])
        raise KeyError("from the caller")

    with pytest.raises(KeyError, match="from the caller"):  # not replaced by a TypeError
        _C.st_open(p, entries())
    with pytest.raises(ValueError, match="dtype contains a NUL"):
        _C.st_open(p, [("a", "F32\x00junk", [1])])
    with pytest.raises(ValueError, match="shape value out of range"):
        _C.st_open(p, [("a", "F32", [2 ** 70])])
    big = [(f"t{i}", "U8", [2 ** 62]) for i in range(4)] + [("b", "U8", [8])]
    with pytest.raises(ValueError, match="total data size overflows"):
        _C.st_open(p, big)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(sys.version_info < (3, 12), reason="__buffer__ (Python code run while the "
                    "writer takes a buffer) exists from Python 3.12 on")
def test_st_write_survives_a_buffer_that_closes_the_writer(tmp_path):
    h = _C.st_open(str(tmp_path / "x.safetensors"), [("a", "U8", [4])])

    class Evil:
        def __buffer__(self, flags):
            _C.st_abort(h)
            return memoryview(b"abcd")

    with pytest.raises(RuntimeError, match="closed or aborted while its data buffer"):
        _C.st_write(h, 0, Evil())
    assert os.listdir(tmp_path) == []


def test_export_writes_lazy_negated_tensors_negated(tmp_path):
    m = nn.Sequential(nn.Linear(64, 16))
    m.register_buffer("n", torch.arange(1, 5, dtype=torch.int32)._neg_view())
    assert m.n.is_neg()
    export_awq(m, str(tmp_path / "o"), group_size=32, progress=False)
    t, _ = read_export(str(tmp_path / "o"))
    assert t["n"].tolist() == [-1, -2, -3, -4]


def test_unaligned_half_tensors(tmp_path):
    """16-bit data at an odd address (torch.frombuffer with an odd offset):
    same results as an aligned copy."""
    torch.manual_seed(7)
    for dt in (torch.bfloat16, torch.float16):
        w = torch.randn(8, 64).to(dt)
        raw = bytearray(1 + w.numel() * 2)
        raw[1:] = w.view(torch.uint8).flatten().numpy().tobytes()
        wu = torch.frombuffer(raw, dtype=dt, count=w.numel(), offset=1).view(8, 64)
        assert wu.data_ptr() % 2 == 1 and torch.equal(wu, w)
        for fn in (ao_awq_export.fake_quant_int4_asym, ao_awq_export.fake_quant_fp8_int4):
            a = wu.clone().requires_grad_()  # clone: aligned, the reference
            ref = fn(a, 32)
            ref.backward(torch.ones_like(ref))
            assert torch.equal(fn(wu, 32), ref)
        assert torch.equal(ao_awq_export.fake_quant_fp8_rows(wu), ao_awq_export.fake_quant_fp8_rows(w))
    with pytest.raises(ValueError, match="4-byte aligned"):
        _C.torch_sum(memoryview(bytes(4001))[1:], 8, True)


def test_cli_checks_arguments_before_loading(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    for extra, msg in ((["--max-shard-size", "0"], "max_shard_size"),
                       (["--sqnr-threshold", "nan"], "sqnr-threshold")):
        r = subprocess.run([sys.executable, "-m", "ao_awq_export", "export",
                            str(tmp_path / "does_not_exist.pt"), str(tmp_path / "o")] + extra,
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
        assert r.returncode == 2 and "usage:" in r.stderr and msg in r.stderr \
            and "does_not_exist" not in r.stderr, r.stderr


def test_moe_routers_stay_fp16(outdir):
    """transformers 4.x-style MoE blocks: per-expert Linears are quantized,
    the router Linears (`gate`, `shared_expert_gate`) stay fp16 (SPEC 5)."""
    blk = nn.Module()
    blk.add_module("gate", nn.Linear(64, 8, bias=False))
    blk.add_module("shared_expert_gate", nn.Linear(64, 1, bias=False))  # N=1: never quantizable
    experts = nn.ModuleList()
    for _ in range(2):
        e = nn.Module()
        e.add_module("gate_proj", nn.Linear(64, 32))
        e.add_module("up_proj", nn.Linear(64, 32))
        experts.append(e)
    blk.add_module("experts", experts)
    m = nn.Module()
    m.add_module("mlp", blk)
    rep = export_awq(m, outdir, group_size=32, progress=False)
    assert sorted(l.name for l in rep.layers) == [f"mlp.experts.{i}.{p}" for i in (0, 1)
                                                   for p in ("gate_proj", "up_proj")]
    assert rep.modules_to_not_convert == ["mlp.gate", "mlp.shared_expert_gate"]
    t, _ = read_export(outdir)
    assert t["mlp.gate.weight"].dtype == torch.float16 and "mlp.gate.qweight" not in t
    cfg = json.load(open(os.path.join(outdir, "config.json")))
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["mlp.gate",
                                                                   "mlp.shared_expert_gate"]


@pytest.mark.parametrize("arch", ["gpt_neox", "bloom", "falcon"])
def test_transformers_gptqmodel_scaled_activation_archs(tmp_path, arch):
    """GPT-NeoX (checkpoint names differ from module names: embed_out),
    Bloom and Falcon (its Linears are FalconLinear) are exported, with the
    ScaledActivation `scales` transformers' AWQ loader expects for these
    model types (else NaN logits)."""
    _need("transformers")
    _need("gptqmodel")
    r = _run(f"""
        import torch
        import transformers as T
        from transformers import AutoModelForCausalLM, AwqConfig
        from safetensors.torch import load_file
        from ao_awq_export.export import export_awq
        torch.manual_seed(0)
        if {arch!r} == "gpt_neox":
            m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=256, hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))
            act = "model.layers.0.mlp.act.scales" if hasattr(m, "model") else \\
                  "gpt_neox.layers.0.mlp.act.scales"
        elif {arch!r} == "bloom":
            m = T.BloomForCausalLM(T.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2,
                                                 n_head=2))
            act = "transformer.h.0.mlp.gelu_impl.scales"
        else:
            m = T.FalconForCausalLM(T.FalconConfig(vocab_size=256, hidden_size=64,
                                                   num_hidden_layers=2, num_attention_heads=2))
        m = m.half().eval()
        out = {str(tmp_path / 'awq')!r}
        rep = export_awq(m, out, group_size=32, progress=False)
        sd = load_file(out + "/model.safetensors")
        scales = [k for k in sd if k.endswith((".act.scales", ".gelu_impl.scales"))]
        assert len(scales) == 2 and all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in scales), scales
        ids = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            for n, mod in m.named_modules():  # the reference: the RTN weights
                if isinstance(mod, torch.nn.Linear) and "lm_head" not in n and "embed_out" not in n:
                    from ao_awq_export import fake_quant_int4_asym
                    mod.weight.copy_(fake_quant_int4_asym(mod.weight, 32, mode="awq"))
            ref = m(ids).logits.float()
        q = AutoModelForCausalLM.from_pretrained(
            out, device_map="cpu", dtype=torch.float16,
            quantization_config=AwqConfig(bits=4, group_size=32, backend="torch_awq"))
        with torch.no_grad():
            got = q(ids).logits.float()
        print("RESULT", len(rep.layers), float((got - ref).abs().max()), float(ref.abs().max()))
        """, timeout=300)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    _, nl, diff, scale = line[0].split()
    assert int(nl) == 8 and float(diff) == float(diff)  # not NaN
    assert float(diff) <= 2e-3 * max(1.0, float(scale)), line


# ----------------------------------------------------------------------------
# bad input found in review: every case a clear exception naming the tensor
# ----------------------------------------------------------------------------
def _int4_tensor_linear(w, g, zero=None):
    """nn.Linear holding a torchao Int4Tensor of w (built as in
    test_int4_tensor_weights); `zero` overrides the zero points [N, K/g]."""
    from torchao.quantization import Int4Tensor

    codes, scale, zp = ao_awq_export.quantize_int4(w, g, scheme="int4_asym", mode="torchao")
    zp = zp if zero is None else zero
    signed = codes.to(torch.int16) - 8
    lo, hi = signed[:, 0::2] & 0xF, signed[:, 1::2] & 0xF
    qdata = (lo | (hi << 4)).to(torch.uint8).view(torch.int8)
    it = Int4Tensor(qdata, scale.t().contiguous().to(w.dtype), zp.t().contiguous().to(w.dtype),
                    [1, g], w.shape)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.dtype)
    lin.weight = nn.Parameter(it, requires_grad=False)
    return lin


def test_int4_tensor_non_finite_or_overflowing_scales_refused(tmp_path):
    torch.manual_seed(5)
    w = torch.randn(16, 64, dtype=torch.float32)
    for strict in (False, True):
        for zero, bad, msg in ((torch.zeros(16, 2), float("nan"), "NaN or Inf"),
                               (torch.zeros(16, 2), 1e6, "overflows float16"),
                               (None, float("nan"), "NaN or Inf")):
            lin = _int4_tensor_linear(w, 32, zero)
            with torch.no_grad():
                if zero is None:
                    lin.weight.zero_point[1, 3] = bad
                else:
                    lin.weight.scale[1, 3] = bad
            with pytest.raises(ValueError, match=rf"^0\.weight: .*{msg}"):
                export_awq(nn.Sequential(lin), str(tmp_path / "o"), group_size=32,
                           strict=strict, progress=False)
    assert os.listdir(tmp_path) == []


def test_converted_layers_group_size_must_match(tmp_path):
    from torchao.quantization import quantize_

    from ao_awq_export.qat import AWQQATConfig

    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(128, 32), nn.Linear(32, 8))
    quantize_(m, AWQQATConfig(group_size=64), filter_fn=lambda mod, f: f == "0")
    quantize_(m, AWQQATConfig(step="convert"))
    assert type(m[0]).__name__ == "AWQInt4Linear"
    with pytest.raises(ValueError, match=r"^0: converted layer with group size 64 .*pass "
                                         r"group_size=64"):
        export_awq(m, str(tmp_path / "o"), group_size=128, modules_to_not_convert=["1"],
                   progress=False)
    with pytest.raises(ValueError, match=r"^0: converted layer with group size 64.*other "
                                         r"quantized layers use 32"):
        export_awq(m, str(tmp_path / "o"), group_size=32, progress=False)  # [1]: RTN at 32
    assert os.listdir(tmp_path) == []
    rep = export_awq(m, str(tmp_path / "o"), group_size=64, modules_to_not_convert=["1"],
                     progress=False)
    cfg = json.load(open(tmp_path / "o" / "config.json"))
    assert cfg["quantization_config"]["group_size"] == 64 == rep.group_size
    t, _ = read_export(str(tmp_path / "o"))
    assert tuple(t["0.qzeros"].shape) == (2, 4) and tuple(t["0.scales"].shape) == (2, 32)
    # without group_size: the converted layer's (it was 128, and refused)
    rep = export_awq(m, str(tmp_path / "o2"), modules_to_not_convert=["1"], progress=False)
    cfg = json.load(open(tmp_path / "o2" / "config.json"))
    assert cfg["quantization_config"]["group_size"] == 64 == rep.group_size


def test_excluded_fake_quant_with_overflowing_scale_says_so(tmp_path):
    m = nn.Sequential(nn.Linear(64, 16), FakeQuantLinear(64, 16, group_size=32, mode="awq"))
    with torch.no_grad():
        m[1].weight.uniform_(-1e6, 1e6)  # finite, but range / 15 > 65504
    with pytest.raises(ValueError, match=r"^1\.weight: the fake-quant weight .* not finite "
                                         r"although the weight is: a group scale overflows"):
        export_awq(m, str(tmp_path / "o"), group_size=32, modules_to_not_convert=["1"],
                   progress=False)
    assert os.listdir(tmp_path) == []


class _ExtraState(nn.Module):
    def get_extra_state(self):
        return {"step": 3}

    def set_extra_state(self, state):
        pass


def test_state_dict_entries_safetensors_cannot_hold(tmp_path):
    cases = []
    m = nn.Sequential(nn.Linear(64, 16), _ExtraState())
    cases.append((m, TypeError, r"^1\._extra_state: the state dict holds a dict"))
    m = nn.Sequential(nn.Linear(64, 16))
    m.register_buffer("sp", torch.eye(3).to_sparse())
    cases.append((m, ValueError, r"^sp: a torch\.sparse_coo tensor"))
    m = nn.Sequential(nn.Linear(64, 16))
    m.register_buffer("c", torch.ones(3, dtype=torch.complex64))
    cases.append((m, TypeError, r"^c: dtype torch\.complex64 cannot be stored"))
    m = nn.Sequential(nn.Linear(64, 16))
    m[0].bias = nn.Parameter(torch.ones(16, dtype=torch.complex64))
    cases.append((m, TypeError, r"^0\.bias: dtype torch\.complex64 is not a real floating"))
    for m, err, msg in cases:
        with pytest.raises(err, match=msg):
            export_awq(m, str(tmp_path / "o"), group_size=32, progress=False)
    assert os.listdir(tmp_path) == []


def test_linear_tensors_must_match_their_sizes(tmp_path, caplog):
    def bad(setup, err, msg):
        m = nn.Sequential(nn.Linear(128, 16), nn.Linear(16, 8))
        setup(m[0])
        with pytest.raises(err, match=msg):
            export_awq(m, str(tmp_path / "o"), group_size=32, modules_to_not_convert=["1"],
                       progress=False)

    bad(lambda l: setattr(l, "weight", nn.Parameter(torch.randn(8, 128))), ValueError,
        r"^0\.weight: shape \(8, 128\) does not match .* \[16, 128\]")
    bad(lambda l: setattr(l, "weight", nn.Parameter(torch.randn(16, 64))), ValueError,
        r"^0\.weight: shape \(16, 64\) does not match")
    bad(lambda l: setattr(l, "bias", nn.Parameter(torch.randn(8))), ValueError,
        r"^0\.bias: shape \(8,\) does not match .* \[16\]")
    bad(lambda l: setattr(l, "weight", None), TypeError, r"^0\.weight: NoneType, not a tensor")
    with caplog.at_level("WARNING"):
        bad(lambda l: setattr(l, "weight", nn.Parameter(torch.randn(16, 128, 1))), ValueError,
            r"^0\.weight: shape \(16, 128, 1\) does not match")
    assert "unquantized" not in caplog.text  # no contradicting "written in fp16" warning
    with pytest.raises(ValueError, match=r"^0: an empty Linear"):
        export_awq(nn.Sequential(nn.Linear(64, 0)), str(tmp_path / "o"), group_size=32,
                   progress=False)
    assert os.listdir(tmp_path) == []


def test_argument_types_and_configs(tmp_path):
    m = nn.Sequential(nn.Linear(128, 16))
    out = str(tmp_path / "o")
    for g in (128.0, np.int64(128), True):
        with pytest.raises(TypeError, match="group_size must be an int"):
            export_awq(m, out, group_size=g, progress=False)
        with pytest.raises(TypeError, match="group_size must be an int"):
            FakeQuantLinear(128, 16, group_size=g)
    for kw in (dict(scheme=[]), dict(mode={})):
        with pytest.raises(ValueError, match="must be one of"):
            export_awq(m, out, progress=False, **kw)
    with pytest.raises(TypeError, match="modules_to_not_convert must hold strings.*1"):
        export_awq(m, out, modules_to_not_convert=["x", 1], progress=False)
    with pytest.raises(TypeError, match="modules_to_not_convert must be a string or a list"):
        export_awq(m, out, modules_to_not_convert=5, progress=False)
    cfg = tmp_path / "cfg.json"
    for text, msg in (("[1, 2]", "a config.json must hold a JSON object, got list"),
                      ('{"a": ', "not a valid JSON config"),
                      ('{"a": NaN}', "not a valid JSON config.*NaN")):
        cfg.write_text(text)
        with pytest.raises(ValueError, match=rf"cfg\.json: {msg}"):
            export_awq(m, out, hf_config=str(cfg), progress=False)
    cfg.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"cfg\.json: not a valid JSON config"):
        export_awq(m, out, hf_config=str(cfg), progress=False)
    with pytest.raises(TypeError, match="hf_config: .*Tensor"):
        export_awq(m, out, hf_config={"w": torch.ones(1)}, progress=False)
    with pytest.raises(ValueError, match="hf_config: .*(NaN|nan)"):
        export_awq(m, out, hf_config={"x": float("nan")}, progress=False)
    os.mkdir(tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(FileExistsError, match="symbolic link"):
        export_awq(m, str(tmp_path / "link"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "link", "real"]
    export_awq(m, os.fsencode(out), progress=False)  # a bytes path is a path
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_cli_unreadable_checkpoints(tmp_path):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    data = (tmp_path / "sd.pt").read_bytes()
    torch.save(nn.Linear(256, 256).state_dict(), tmp_path / "big.pt")
    big = (tmp_path / "big.pt").read_bytes()
    files = {"empty.pt": b"", "trunc.pt": data[: len(data) // 2],
             "garbage.pt": b"\x80\x04not a checkpoint" * 8,
             # torch.load raises a bare OSError (EINVAL, no file name) on these
             "trunc5k.pt": big[:5000], "trunc20k.pt": big[:20000]}
    env = dict(os.environ, PYTHONPATH=REPO)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        for extra in ([], ["--allow-pickle"]):
            r = subprocess.run([sys.executable, "-m", "ao_awq_export", "export",
                                str(tmp_path / name), str(tmp_path / "o")] + extra,
                               capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
            assert r.returncode == 1, r.stderr
            assert "Traceback" not in r.stderr and "--allow-pickle" not in r.stderr, r.stderr
            assert f"{name}: cannot read the checkpoint" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_finiteness_check_in_slices():
    """_all_finite (the export's check of every fp16 tensor it writes) looks at
    every slice, the last partial one included."""
    n = 2 * ex._CHUNK_ELEMS + 5
    t = torch.zeros(n, dtype=torch.float16)
    assert ex._all_finite(t) and ex._all_finite(t[:0])
    for i in (0, ex._CHUNK_ELEMS - 1, ex._CHUNK_ELEMS, n - 1):
        u = t.clone()
        u[i] = float("inf")
        assert not ex._all_finite(u)
        w = torch.zeros(n, 2, dtype=torch.float16)
        w[i, 1] = float("inf")
        assert not ex._all_finite(w[:, 1]) and ex._all_finite(w[:, 0])  # strided views


def test_wrapped_models_export_under_their_own_names(tmp_path):
    """torch.compile's OptimizedModule and nn.DataParallel prefix every
    state_dict key (`_orig_mod.`, `module.`): the export writes the wrapped
    model's names and config, so a loader finds its weights."""
    _need("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2))
    export_awq(m, str(tmp_path / "plain"), group_size=32, progress=False)
    want = load_file(str(tmp_path / "plain" / "model.safetensors"))
    conf = json.load(open(tmp_path / "plain" / "config.json"))
    for i, w in enumerate([torch.compile(m), nn.DataParallel(m), torch.compile(nn.DataParallel(m))]):
        out = tmp_path / f"w{i}"
        export_awq(w, str(out), group_size=32, progress=False)
        got = load_file(str(out / "model.safetensors"))
        assert sorted(got) == sorted(want), type(w).__name__
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert json.load(open(out / "config.json")) == conf


def test_architectures_named_for_models_built_from_a_config(tmp_path):
    """A model built from its config has config.architectures None; vLLM picks
    the model class by that field, so the export names the class, as
    save_pretrained does."""
    _need("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    m = LlamaForCausalLM(cfg)
    assert not m.config.architectures
    export_awq(m, str(tmp_path / "o"), group_size=32, progress=False)
    assert json.load(open(tmp_path / "o" / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    m.config.architectures = ["SomethingElse"]  # one that is set is kept
    export_awq(m, str(tmp_path / "o2"), group_size=32, progress=False)
    assert json.load(open(tmp_path / "o2" / "config.json"))["architectures"] == ["SomethingElse"]


def test_tied_embedding_is_the_key_written(tmp_path):
    """lm_head registered before the embedding it is tied to: the embedding's
    key is written (SPEC 5) and the tie recorded, whatever the order."""
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(64, 96, bias=False)
            self.embed_tokens = nn.Embedding(96, 64)
            self.lm_head.weight = self.embed_tokens.weight
            self.proj = nn.Linear(64, 64)

    m = HeadFirst()
    out = tmp_path / "o"
    export_awq(m, str(out), group_size=32, progress=False)
    t = load_file(str(out / "model.safetensors"))
    assert "embed_tokens.weight" in t and "lm_head.weight" not in t
    assert torch.equal(t["embed_tokens.weight"], m.embed_tokens.weight.detach().half())
    assert json.load(open(out / "config.json"))["tie_word_embeddings"] is True


def test_reparametrized_weights_are_refused(tmp_path):
    """parametrize (weight_norm, pruning) stores a weight as
    parametrizations.weight.original*, the old weight_norm as weight_g /
    weight_v: refused with what to do, instead of a layer left out."""
    from torch.nn.utils import parametrizations, parametrize

    for bias in (False, True):
        m = nn.Sequential(nn.Linear(64, 64, bias=bias), nn.Linear(64, 64))
        parametrizations.weight_norm(m[0])
        with pytest.raises(ValueError, match=r"^0: weight is reparametrized.*remove_parametrizations"):
            export_awq(m, str(tmp_path / "o"), group_size=32, progress=False)
        parametrize.remove_parametrizations(m[0], "weight")
        export_awq(m, str(tmp_path / f"ok{bias}"), group_size=32, progress=False)
        assert {"0.qweight", "1.qweight"} <= set(load_file(str(tmp_path / f"ok{bias}" / "model.safetensors")))
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        torch.nn.utils.weight_norm(m[1])
    with pytest.raises(ValueError, match=r"^1: weight is weight-normed .*remove_weight_norm"):
        export_awq(m, str(tmp_path / "o"), group_size=32, progress=False)
    assert not (tmp_path / "o").exists()


def test_out_dir_that_cannot_be_renamed_onto(tmp_path, monkeypatch):
    """An empty out_dir that is a mount point (a container's volume) cannot be
    replaced by a rename: the export is made in a temporary directory inside
    it and its files moved up, config.json last; a failed move leaves out_dir
    empty again."""
    import ao_awq_export.export as ex

    m = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))  # 2 shards of 40 KB
    vol = tmp_path / "vol"
    vol.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(ex.os.path, "ismount", lambda p: os.fspath(p) == str(vol) or real(p))
    moves = []
    real_rename = os.rename

    def rename(a, b):
        moves.append(os.path.basename(b))
        return real_rename(a, b)

    monkeypatch.setattr(ex.os, "rename", rename)
    export_awq(m, str(vol), max_shard_size="40KB", group_size=32, progress=False)
    names = sorted(os.listdir(vol))
    assert names == ["config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert moves[-1] == "config.json" and len(moves) == 4
    assert leftovers(tmp_path) == ["vol"]
    assert read_export(str(vol))  # a complete export
    # a move that fails: nothing is left, in out_dir or beside it
    vol2 = tmp_path / "vol2"
    vol2.mkdir()
    monkeypatch.setattr(ex.os.path, "ismount", lambda p: os.fspath(p) == str(vol2) or real(p))

    def failing(a, b):
        if os.path.basename(b) == "config.json":
            raise OSError(errno.EXDEV, "Invalid cross-device link", b)
        return real_rename(a, b)

    monkeypatch.setattr(ex.os, "rename", failing)
    with pytest.raises(OSError, match="cannot move the finished export into place"):
        export_awq(m, str(vol2), max_shard_size="40KB", group_size=32, progress=False)
    assert os.listdir(vol2) == []
    assert leftovers(tmp_path) == ["vol", "vol2"]


# ----------------------------------------------------------------------------
# what each consumer makes of config.json and the file names (review of
# 2026-12-03: vLLM, AutoAWQ, GPTQModel, transformers)
# ----------------------------------------------------------------------------
class _Converted(nn.Module):
    """A layer already in AWQ form (what AWQInt4Linear holds), without torchao."""

    def __init__(self, k, n, g):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(k, n // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(k // g, n // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(k // g, n, dtype=torch.float16))


def _blocks(n_layers, extra=()):
    """model.layers.<i>.{self_attn.{q,k,v,o}_proj, mlp.{up,down}_proj, *extra}"""
    m = nn.Module()
    m.model = nn.Module()
    m.model.layers = nn.ModuleList()
    for _ in range(n_layers):
        b = nn.Module()
        b.self_attn = nn.Module()
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            b.self_attn.add_module(p, nn.Linear(64, 64))
        b.mlp = nn.Module()
        b.mlp.up_proj, b.mlp.down_proj = nn.Linear(64, 128), nn.Linear(128, 64)
        for e in extra:
            b.add_module(e, nn.Module())
            getattr(b, e).down_proj = nn.Linear(128, 64)
        m.model.layers.append(b)
    return m


def _stack(n, sub, **linears):
    """n blocks, each with <sub>.<name> = nn.Linear(*linears[name])."""
    blocks = nn.ModuleList()
    for _ in range(n):
        b = nn.Module()
        b.add_module(sub, nn.Module())
        for name, (k, o) in linears.items():
            getattr(b, sub).add_module(name, nn.Linear(k, o))
        blocks.append(b)
    return blocks


def _skipped_by(rule, pattern_list, names):
    return {n for n in names if any(rule(p, n) for p in pattern_list)}


def test_converted_layers_count_in_fused_and_substring_checks(tmp_path):
    """A converted q/k beside a v_proj kept in fp16 is the mixed fused layer
    vLLM refuses ("some but not all shards"); an fp16 name inside a converted
    one would make consumers skip the converted layer too."""
    m = _blocks(1)
    at = m.model.layers[0].self_attn
    at.q_proj, at.k_proj = _Converted(64, 64, 32), _Converted(64, 64, 32)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn: \['v_proj'\] would stay "
                                         r"float16 while \['k_proj', 'q_proj'\] are quantized"):
        export_awq(m, str(tmp_path / "a"), group_size=32, progress=False,
                   modules_to_not_convert=["v_proj"])
    m = _blocks(1)
    m.model.layers[0].mlp.up_proj = _Converted(64, 128, 32)
    m.model.layers[0].mlp.up = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up' is left in float16 but its "
                                         r"name is a substring of the quantized module "
                                         r"'model.layers.0.mlp.up_proj'"):
        export_awq(m, str(tmp_path / "b"), group_size=32, progress=False,
                   modules_to_not_convert=["mlp.up"])
    assert leftovers(tmp_path) == []
    # all of q/k/v converted, v excluded by nobody: fine
    m = _blocks(1)
    for p in ("q_proj", "k_proj", "v_proj"):
        setattr(m.model.layers[0].self_attn, p, _Converted(64, 64, 32))
    export_awq(m, str(tmp_path / "c"), group_size=32, progress=False)
    t, _ = read_export(str(tmp_path / "c"))
    assert "model.layers.0.self_attn.v_proj.qweight" in t


def test_modules_to_not_convert_as_each_consumer_matches_it(tmp_path, caplog):
    """config.json's modules_to_not_convert is matched by substring (vLLM,
    AutoAWQ < transformers 5), by suffix or from the start (transformers 5)
    against full names, and by AutoAWQ against names relative to a decoder
    block: every fp16 layer is written by its full name (SPEC 5) and, when
    excluded in every block, by its relative name too (want_rel), so that all
    of them skip exactly the excluded layers; GPTQModel.load reads
    only `dynamic`, which names each excluded layer."""
    def substring(p, n):
        return p in n

    def transformers5(p, n):  # quantizers_utils.should_convert_module, transformers 5.23
        return bool(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", n)) or n.endswith(p)

    def relative(p, n):  # AutoAWQ: the name within model.layers[i]
        mm = re.match(r"^model\.layers\.\d+\.(.+)$", n)
        return mm is not None and p in mm.group(1)

    def fused_prefix(n, names):  # SGLang / older vLLM: the fused layer's name
        pre, _, last = n.rpartition(".")
        for members, f in (({"q_proj", "k_proj", "v_proj"}, "qkv_proj"),
                           ({"gate_proj", "up_proj"}, "gate_up_proj")):
            if last in members and all(f"{pre}.{x}" in names for x in members):
                return f"{pre}.{f}"
        return n

    def check(m, skip, want_rel, *, autoawq_ok=True):
        out = str(tmp_path / f"o{len(os.listdir(tmp_path))}")
        caplog.clear()
        with caplog.at_level("WARNING", logger="ao_awq_export.export"):
            rep = export_awq(m, out, group_size=32, progress=False, modules_to_not_convert=skip)
        qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
        assert qc["modules_to_not_convert"] == rep.modules_to_not_convert + want_rel
        want_cfg = qc["modules_to_not_convert"]
        names = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
        excluded = set(rep.modules_to_not_convert)
        t, _ = read_export(out)
        assert excluded == {n for n in names if f"{n}.weight" in t}
        assert _skipped_by(substring, want_cfg, names) == excluded
        assert _skipped_by(transformers5, want_cfg, names) == excluded
        in_blocks = {n for n in excluded if n.startswith("model.layers.")}
        assert (_skipped_by(relative, want_cfg, names) == in_blocks) == autoawq_ok
        assert {n for n in names if any(p in fused_prefix(n, names) for p in want_cfg)} == \
            excluded
        assert ("AutoAWQ matches names within a block" in caplog.text) == (not autoawq_ok)
        # GPTQModel: exact negative rules, one per excluded layer
        assert qc["dynamic"] == {f"-:^{re.escape(n)}$": {} for n in rep.modules_to_not_convert}
        return qc

    # excluded in every block: the full names (SPEC 5), then the relative name
    check(_blocks(3), ["down_proj"], ["mlp.down_proj"])
    check(_blocks(3), ["mlp", "o_proj"], ["self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"])
    # one block only: full names (AutoAWQ cannot say it; warned)
    check(_blocks(3), ["layers.1.mlp.down_proj"], [], autoawq_ok=False)
    check(_blocks(3), ["layers.1.self_attn"], ["model.layers.1.self_attn.qkv_proj"],
          autoawq_ok=False)
    # a relative name inside a quantized name elsewhere (shared_mlp.down_proj): full names
    m = _blocks(2, extra=("shared_mlp",))
    check(m, ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"], [], autoawq_ok=False)
    # outside numbered blocks: as before
    m = _blocks(2)
    m.extra = nn.Linear(64, 64)
    check(m, ["extra"] + [f"layers.{i}.self_attn" for i in range(2)],
          ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj",
           "self_attn.qkv_proj"])
    # nothing excluded: no dynamic rules
    out = str(tmp_path / "none")
    export_awq(_blocks(1), out, group_size=32, progress=False)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["modules_to_not_convert"] is None and "dynamic" not in qc


def test_real_consumers_skip_the_excluded_layers(tmp_path):
    """transformers' should_convert_module, AutoAWQ's
    exclude_layers_to_not_quantize and GPTQModel.load (which needs the
    tokenizer in the directory: copied from hf_config) on an export with
    down_proj kept in fp16: each builds nn.Linear for down_proj and an AWQ
    layer for the rest, and GPTQModel's logits match transformers'."""
    _need("transformers")
    _need("gptqmodel")
    _need("awq")
    r = _run(f"""
        import contextlib, io, json, os, torch
        import transformers as T
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers.quantizers.quantizers_utils import should_convert_module
        from ao_awq_export.export import export_awq
        torch.manual_seed(0)
        cfg = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        m = T.LlamaForCausalLM(cfg).half().eval()
        hf = {str(tmp_path / 'hf')!r}
        m.save_pretrained(hf)
        vocab = {{chr(97 + i): i for i in range(26)}}
        vocab["<unk>"] = 26
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                  eos_token="<unk>").save_pretrained(hf)
        out = {str(tmp_path / 'awq')!r}
        export_awq(m, out, group_size=32, modules_to_not_convert=["down_proj"], hf_config=hf,
                   progress=False)
        assert {{"tokenizer.json", "tokenizer_config.json"}} <= set(os.listdir(out))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert open(os.path.join(out, f), "rb").read() == open(os.path.join(hf, f), "rb").read()
        qc = json.load(open(out + "/config.json"))["quantization_config"]
        lin = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear) and n != "lm_head"]
        kept = sorted(n for n in lin if not should_convert_module(n, qc["modules_to_not_convert"]))
        with contextlib.redirect_stderr(io.StringIO()):
            from awq.utils.module import get_named_linears, exclude_layers_to_not_quantize
        aw = sorted(exclude_layers_to_not_quantize(get_named_linears(m.model.layers[0]),
                                                   qc["modules_to_not_convert"]))
        from gptqmodel import GPTQModel
        g = GPTQModel.load(out, device="cpu", dtype=torch.float16)
        kinds = {{n: type(x).__name__ for n, x in g.model.named_modules() if n in lin}}
        q = T.AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16)
        from ao_awq_export import fake_quant_int4_asym
        ids = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            for n in lin:  # the reference: the RTN weights, down_proj as it is
                if "down_proj" not in n:
                    w = m.get_submodule(n).weight
                    w.copy_(fake_quant_int4_asym(w, 32, mode="awq"))
            ref = m(ids).logits.float()
            a, b = g.model(ids).logits.float(), q(ids).logits.float()
        print("RESULT", json.dumps([kept, aw, kinds, float((a - ref).abs().max()),
                                    float((b - ref).abs().max()), float(ref.abs().max())]))
        """, timeout=400)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    kept, aw, kinds, da, db, scale = json.loads(line[0][len("RESULT "):])
    assert kept == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert aw == ["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                  "self_attn.q_proj", "self_attn.v_proj"]
    assert {n: k for n, k in kinds.items() if k == "Linear"} == {n: "Linear" for n in kept}
    assert len(kinds) == 14
    assert max(da, db) <= 2e-3 * max(1.0, scale), (da, db, scale)


def test_tokenizer_files_are_copied_from_hf_config(tmp_path, caplog):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "tiny"}')
    files = {"tokenizer.json": b'{"x": 1}', "tokenizer_config.json": b"{}",
             "special_tokens_map.json": b"{}", "merges.txt": b"a b\n",
             "chat_template.jinja": b"{{ messages }}", "tokenizer.model": bytes(range(256)),
             "tokenization_tiny.py": b"# remote code", "configuration_tiny.py": b"# config",
             "modeling_tiny.py": b"# model"}
    for f, b in files.items():
        (hf / f).write_bytes(b)
    (hf / "pytorch_model.bin").write_bytes(b"no")
    (hf / "README.md").write_text("no")
    (hf / "train.py").write_text("no")
    out = str(tmp_path / "o")
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        rep = export_awq(Tiny(), out, group_size=32, hf_config=str(hf), progress=False)
    assert "no tokenizer files" not in caplog.text
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors"] + list(files))
    assert sorted(rep.files) == sorted(os.listdir(out))
    for f, b in files.items():
        assert open(os.path.join(out, f), "rb").read() == b
    caplog.clear()
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(Tiny(), str(tmp_path / "o2"), group_size=32, progress=False)
    assert "no tokenizer files written" in caplog.text


def test_tokenizer_extra_files_and_named_chat_templates(tmp_path):
    """A real tokenizer saved with named chat templates (transformers writes
    every name but "default" to additional_chat_templates/<name>.jinja) and
    one with a vocabulary file of its own (GPT-NeoX-Japanese's emoji.json):
    the export's tokenizer loads and picks the same templates; a remote-code
    tokenizer's declared vocabulary files come along too."""
    _need("transformers")
    import transformers as T
    from transformers import AutoTokenizer
    hf = tmp_path / "hf"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "h": 3, "i": 4, "hi": 5}
    tok = T.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer(
        __import__("tokenizers").models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = {"default": "DEFAULT{{ messages[0]['content'] }}",
                         "tool_use": "TOOLS{{ messages[0]['content'] }}",
                         "rag": "RAG{{ messages[0]['content'] }}"}
    tok.save_pretrained(hf)
    assert sorted(os.listdir(hf / "additional_chat_templates")) == ["rag.jinja", "tool_use.jinja"]
    (hf / "config.json").write_text('{"model_type": "llama"}')
    # a remote-code tokenizer declaring a file of its own, and one it does not
    # (and names the export writes itself, or weights, are never taken from there)
    (hf / "tokenization_tiny.py").write_text(
        'VOCAB_FILES_NAMES = {"vocab_file": "./ice_text.model", "x": "missing.model",\n'
        '                     "c": "config.json", "g": "generation_config.json",\n'
        '                     "w": "model.safetensors", "up": "../up.model"}\n')
    (hf / "ice_text.model").write_bytes(b"ice")
    (hf / "generation_config.json").write_text('{"max_length": 7}')
    (hf / "model.safetensors").write_bytes(b"not these")
    (tmp_path / "up.model").write_bytes(b"outside")
    (hf / "additional_chat_templates" / "notes.txt").write_text("not a template")
    out = str(tmp_path / "o")
    rep = export_awq(Tiny(), out, group_size=32, hf_config=str(hf), progress=False)
    assert sorted(os.listdir(os.path.join(out, "additional_chat_templates"))) == \
        ["rag.jinja", "tool_use.jinja"]
    assert "additional_chat_templates/tool_use.jinja" in rep.files
    assert open(os.path.join(out, "ice_text.model"), "rb").read() == b"ice"
    assert not os.path.exists(os.path.join(out, "missing.model"))
    assert json.load(open(os.path.join(out, "generation_config.json"))) == {"max_length": 7}
    assert not os.path.exists(os.path.join(out, "up.model"))
    assert read_export(out)[0]  # (our model.safetensors, not the one in hf)
    got = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "d",
                                               "parameters": {"type": "object",
                                                              "properties": {}}}}]
    for kw in ({}, {"tools": tools}, {"chat_template": "rag"}):
        want = tok.apply_chat_template(msgs, tokenize=False, **kw)
        assert got.apply_chat_template(msgs, tokenize=False, **kw) == want, kw
    assert got.apply_chat_template(msgs, tokenize=False, tools=tools) == "TOOLShi"
    # a tokenizer class with a vocabulary file of its own
    hj = tmp_path / "hj"
    hj.mkdir()
    (hj / "vocab.txt").write_text("<|endoftext|>\n<|startoftext|>\n<|padding|>\nこ\nん\n")
    (hj / "emoji.json").write_text('{"emoji": {}, "emoji_inv": {}}')
    T.GPTNeoXJapaneseTokenizer(str(hj / "vocab.txt"), str(hj / "emoji.json")).save_pretrained(hj)
    (hj / "config.json").write_text('{"model_type": "gpt_neox_japanese"}')
    out2 = str(tmp_path / "o2")
    export_awq(Tiny(), out2, group_size=32, hf_config=str(hj), progress=False)
    assert os.path.isfile(os.path.join(out2, "emoji.json"))
    assert AutoTokenizer.from_pretrained(out2)("こん")["input_ids"] == \
        AutoTokenizer.from_pretrained(str(hj))("こん")["input_ids"]


def test_tokenizer_templates_survive_the_move_into_a_mount_point(tmp_path):
    """Where out_dir is an existing empty directory the temporary one cannot
    be renamed onto (a mount point), files are moved up one by one: the
    templates' sub-directory moves whole, and a failed move takes it back."""
    hf = tmp_path / "hf"
    (hf / "additional_chat_templates").mkdir(parents=True)
    (hf / "config.json").write_text('{"model_type": "tiny"}')
    (hf / "tokenizer.json").write_text("{}")
    (hf / "additional_chat_templates" / "rag.jinja").write_text("RAG")
    from ao_awq_export import export as E
    out = tmp_path / "o"
    out.mkdir()
    tmp = out / ".tmp-x"
    tmp.mkdir()
    (tmp / "additional_chat_templates").mkdir()
    for f in ("model.safetensors", "tokenizer.json", "additional_chat_templates/rag.jinja",
              "config.json"):
        (tmp / f).write_text(f)
    files = ["model.safetensors", "config.json", "tokenizer.json",
             "additional_chat_templates/rag.jinja"]
    E._move_into(str(tmp), str(out), files)
    assert sorted(os.listdir(out)) == ["additional_chat_templates", "config.json",
                                       "model.safetensors", "tokenizer.json"]
    assert (out / "additional_chat_templates" / "rag.jinja").read_text() == \
        "additional_chat_templates/rag.jinja"
    # a failure after the directory moved: everything moved is taken back
    out2 = tmp_path / "o2"
    out2.mkdir()
    tmp2 = out2 / ".tmp-y"
    (tmp2 / "additional_chat_templates").mkdir(parents=True)
    (tmp2 / "additional_chat_templates" / "rag.jinja").write_text("x")
    (tmp2 / "a").write_text("a")
    with pytest.raises(OSError, match="cannot move the finished export"):
        E._move_into(str(tmp2), str(out2), ["a", "additional_chat_templates/rag.jinja",
                                            "config.json"])  # config.json is missing
    assert sorted(os.listdir(out2)) == [".tmp-y"]


def test_write_errors_name_the_file(tmp_path):
    """A failure writing config.json (not a shard) names that file, and
    leaves nothing under the final name (RLIMIT_FSIZE: a config.json larger
    than the limit, the shard smaller)."""
    out = str(tmp_path / "o")
    r = _run(f"""
        import resource, torch.nn as nn
        from ao_awq_export.export import export_awq
        m = nn.Module(); m.lin = nn.Linear(64, 64)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        try:
            export_awq(m, {out!r}, group_size=32, progress=False,
                       hf_config={{"model_type": "llama", "pad": "x" * 300_000}})
        except OSError as e:
            print("ERR", type(e).__name__, e)
        """)
    assert "ERR OSError" in r.stdout and "writing config.json" in r.stdout, r.stdout + r.stderr
    assert "File too large" in r.stdout
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_export_does_not_import_dynamo():
    """unwrap_model looks for torch.compile's wrapper only where dynamo is
    loaded (importing it costs over a second per process); a compiled model
    is still unwrapped (test_wrapped_models_export_under_their_own_names)."""
    r = _run("""
        import sys, tempfile, os, torch.nn as nn
        from ao_awq_export.export import export_awq
        m = nn.Module(); m.lin = nn.Linear(64, 64)
        export_awq(m, os.path.join(tempfile.mkdtemp(), "o"), group_size=32, progress=False)
        print("DYNAMO", "torch._dynamo" in sys.modules)
        """)
    assert "DYNAMO False" in r.stdout, r.stdout + r.stderr


def test_default_group_size_is_the_models_own(tmp_path):
    """Without group_size, plain Linears take the group size of the model's
    FakeQuantLinear layers (it was 128, and a g=64 QAT model with plain
    Linears failed with 'one group size'); with none, 128; the CLI too."""
    m = nn.Module()
    m.a = FakeQuantLinear(128, 64, scheme="int4_asym", mode="awq", group_size=64)
    m.b = nn.Linear(128, 64)
    m.lm_head = FakeQuantLinear(64, 64, group_size=32)  # kept fp16: does not count
    rep = export_awq(m, str(tmp_path / "o"), progress=False)
    assert rep.group_size == 64 and {l.group_size for l in rep.layers} == {64}
    p = nn.Module()
    p.b = nn.Linear(256, 64)
    assert export_awq(p, str(tmp_path / "o2"), progress=False).group_size == 128
    # a size AWQ cannot hold is not passed on: the error names the layer using it
    q = nn.Module()
    q.a = nn.Linear(256, 64)
    q.b = FakeQuantLinear(256, 64, group_size=256)
    with pytest.raises(ValueError, match=r"^b: group size 256 cannot be exported"):
        export_awq(q, str(tmp_path / "o4"), progress=False)
    ck = str(tmp_path / "m.pt")
    torch.save(m, ck)
    r = _run(f"""
        import sys
        from ao_awq_export.__main__ import main
        sys.exit(main(["export", {ck!r}, {str(tmp_path / "o3")!r}, "--allow-pickle",
                       "--no-progress"]))
        """)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = json.load(open(tmp_path / "o3" / "config.json"))
    assert cfg["quantization_config"]["group_size"] == 64


def test_progress_bar_counts_bytes_and_layers(tmp_path, capsys):
    """The tqdm bar runs over the bytes written and shows the quantized
    layers written so far (issue 4: "over layers and bytes")."""
    _need("tqdm")
    export_awq(Tiny(), str(tmp_path / "o"), group_size=32)  # progress=True
    err = capsys.readouterr().err
    assert "AWQ export" in err and "layers 0/2" in err and "layers 2/2" in err, err
    assert re.search(r"100%\|.*\| ([0-9.]+k?)/\1 \[.*B/s", err), err  # bytes, all of them
    export_awq(Tiny(), str(tmp_path / "q"), group_size=32, progress=False)
    assert "AWQ export" not in capsys.readouterr().err


def test_act_scales_can_be_left_out_for_vllm(tmp_path, caplog):
    """GPT-NeoX's ScaledActivation scales are written by default (transformers
    needs them: test_transformers_gptqmodel_scaled_activation_archs) with a
    warning that vLLM refuses them; act_scales=False (CLI --no-act-scales)
    leaves them out and nothing else changes."""
    _need("transformers")
    import transformers as T
    torch.manual_seed(0)
    m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=256, hidden_size=64,
                                             intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2)).half().eval()
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(m, str(tmp_path / "a"), group_size=32, progress=False)
    assert "2 ScaledActivation scales" in caplog.text and "act_scales=False" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(m, str(tmp_path / "b"), group_size=32, progress=False, act_scales=False)
    assert "ScaledActivation" not in caplog.text
    ta, _ = read_export(str(tmp_path / "a"))
    tb, _ = read_export(str(tmp_path / "b"))
    acts = {k for k in ta if k.endswith(".act.scales")}
    assert acts == {f"gpt_neox.layers.{i}.mlp.act.scales" for i in range(2)}
    assert set(tb) == set(ta) - acts and all(torch.equal(ta[k], tb[k]) for k in tb)
    sd = str(tmp_path / "sd.pt")
    torch.save(m.state_dict(), sd)
    m.config.save_pretrained(str(tmp_path / "hf"))
    from ao_awq_export.__main__ import main
    assert main(["export", sd, str(tmp_path / "c"), "--hf-config", str(tmp_path / "hf"),
                 "--group-size", "32", "--no-act-scales", "--no-progress"]) == 0
    tc, _ = read_export(str(tmp_path / "c"))
    assert set(tc) == set(tb)


def test_vllm_kernel_shapes_are_warned(tmp_path, caplog):
    """vLLM runs an AWQ layer with Marlin (N % 64, K % 128) or awq_gemm
    (N % 64, N % group size); with K % g == 0 and g in (32, 64, 128) one
    fits exactly when N % 64 == 0, else a warning says vLLM will refuse."""
    def warned(n, k, g, converted=False):
        m = nn.Module()
        m.lin = _Converted(k, n, g) if converted else nn.Linear(k, n)
        caplog.clear()
        with caplog.at_level("WARNING", logger="ao_awq_export.export"):
            export_awq(m, str(tmp_path / f"{n}_{k}_{g}_{converted}"), group_size=g,
                       progress=False)
        return "vLLM may refuse this checkpoint" in caplog.text

    assert warned(72, 128, 32) and warned(96, 256, 128) and warned(200, 64, 64)
    assert warned(72, 128, 32, converted=True)
    assert not warned(64, 128, 128) and not warned(128, 96, 32) and not warned(192, 64, 64)
    assert not warned(64, 96, 32, converted=True)
    # vLLM fuses q/k/v (and gate/up): N of the fused layer counts (head_dim 96, one KV head)
    m = nn.Module()
    m.attn = nn.Module()
    m.attn.q_proj, m.attn.k_proj, m.attn.v_proj = (nn.Linear(128, 384), nn.Linear(128, 96),
                                                   nn.Linear(128, 96))
    caplog.clear()
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(m, str(tmp_path / "qkv"), group_size=32, progress=False)
    assert "vLLM may refuse" not in caplog.text
    m.attn.v_proj = nn.Linear(128, 104)
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(m, str(tmp_path / "qkv2"), group_size=32, progress=False)
    assert "attn.q_proj, N=584 fused" in caplog.text


def _tiny_llava(tie=None):
    """A tiny Llava (Llama text model, CLIP vision tower); tie: the
    tie_word_embeddings of both configs (None: the defaults)."""
    import transformers as T
    kw = {} if tie is None else {"tie_word_embeddings": tie}
    cfg = T.LlavaConfig(
        text_config=T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=2, **kw),
        vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         image_size=32, patch_size=8), **kw)
    return T.LlavaForConditionalGeneration(cfg)


@pytest.mark.parametrize("arch", ["gpt_neox", "llava"])
def test_tensor_names_are_those_save_pretrained_writes(tmp_path, arch):
    """transformers 5 renames some checkpoints' tensors in memory (GPT-NeoX's
    embed_out is module lm_head; Llava's language_model.model.* is
    model.language_model.*) and writes the checkpoint names back when saving:
    the export writes those too (vLLM's GPT-NeoX has no `lm_head`), its AWQ
    tensors under the same module names; modules_to_not_convert keeps the
    module names transformers and GPTQModel match."""
    _need("transformers")
    import transformers as T
    torch.manual_seed(0)
    skip = None
    if arch == "gpt_neox":
        m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=256, hidden_size=64,
                                                 intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=2))
    else:
        m = _tiny_llava()
        skip = ["vision_tower", "multi_modal_projector"]
    m = m.half().eval()
    out, sp = str(tmp_path / "awq"), str(tmp_path / "sp")
    rep = export_awq(m, out, group_size=32, progress=False, modules_to_not_convert=skip)
    m.save_pretrained(sp)
    t, _ = read_export(out)
    saved = set(load_file(os.path.join(sp, "model.safetensors")))
    ours = {k[: -len("qweight")] + "weight" if k.endswith(".qweight") else k for k in t
            if not k.endswith((".qzeros", ".scales"))}
    assert ours == saved
    if arch == "gpt_neox":
        assert "embed_out.weight" in t and "lm_head.weight" not in t
        assert torch.equal(t["embed_out.weight"], m.lm_head.weight.detach())
        assert "gpt_neox.layers.0.mlp.act.scales" in t
    else:
        q = "language_model.model.layers.0.self_attn.q_proj"
        assert {f"{q}.qweight", f"{q}.qzeros", f"{q}.scales"} <= set(t)
        assert torch.equal(awq_dequant(t, q, 32, torch.float16), ao_awq_export.fake_quant_int4_asym(
            m.model.language_model.layers[0].self_attn.q_proj.weight.detach(), 32, mode="awq"))
        qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
        assert all(n in rep.modules_to_not_convert for n in qc["modules_to_not_convert"]
                   if n.startswith("model.") and not n.endswith(".qkv_proj"))
        assert "model.vision_tower.encoder.layers.0.self_attn.qkv_proj" in \
            qc["modules_to_not_convert"]  # (the fused name SGLang / older vLLM match)
        assert "vision_tower.encoder.layers.0.self_attn.qkv_proj" in \
            qc["modules_to_not_convert"]  # (and under the file's names)
        assert "model.multi_modal_projector.linear_1" in qc["modules_to_not_convert"]
        # the file's names of the fp16 layers are listed too (a matcher on those)
        assert "multi_modal_projector.linear_1" in qc["modules_to_not_convert"]
        fp16 = {k[: -len(".weight")] for k in t if k.endswith(".weight") and
                ("vision_tower" in k or "multi_modal_projector" in k) and t[k].dim() == 2
                and "embedding" not in k}
        assert len(fp16) == len(rep.modules_to_not_convert) == 8
        assert all(any(p in f for p in qc["modules_to_not_convert"]) for f in fp16), fp16
        quantized = {k[: -len(".qweight")] for k in t if k.endswith(".qweight")}
        assert not [q for q in quantized if any(p in q for p in qc["modules_to_not_convert"])]


_QWEN25_VL = """
import torch, transformers as T
def tiny_qwen2_5_vl():
    # the vision MLP 172 wide (Qwen2.5-VL-7B's is 3420): no AWQ layer can hold it
    cfg = T.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=172, num_heads=4,
                           out_hidden_size=128, fullatt_block_indexes=[1], window_size=112,
                           patch_size=14, spatial_merge_size=2),
        image_token_id=500, video_token_id=501, vision_start_token_id=502)
    torch.manual_seed(0)
    return T.Qwen2_5_VLForConditionalGeneration(cfg).half().eval()
"""


def _tiny_qwen2_5_vl():
    ns = {}
    exec(_QWEN25_VL, ns)
    return ns["tiny_qwen2_5_vl"]()


def test_vlm_towers_stay_fp16_and_transformers_loads_the_export(tmp_path):
    """A vision-language model (Qwen2.5-VL) exported by round to nearest: its
    vision tower and merger stay fp16, as AutoAWQ keeps them (before, the
    export refused the tower's 172-wide MLP); transformers' AWQ loader
    (GPTQModel's torch kernel) builds int4 layers for the text decoder only,
    and its logits on an image prompt match the model with the text
    decoder's weights fake-quantized."""
    _need("transformers")
    _need("gptqmodel")
    r = _run(_QWEN25_VL + textwrap.dedent(f"""
        import json, os
        from safetensors.torch import load_file
        from ao_awq_export import fake_quant_int4_asym
        from ao_awq_export.export import export_awq
        m = tiny_qwen2_5_vl()
        out = {str(tmp_path / 'awq')!r}
        rep = export_awq(m, out, group_size=64, progress=False)
        assert rep.all_exact and len(rep.layers) == 14, rep.layers
        assert all(l.name.startswith("model.language_model.") for l in rep.layers)
        t = load_file(os.path.join(out, "model.safetensors"))
        vis = {{n: mod for n, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and n.startswith("model.visual.")}}
        assert len(vis) == 12 and sorted(rep.modules_to_not_convert) == sorted(vis)
        qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
        for n, mod in vis.items():  # written as they are, under save_pretrained's names
            assert torch.equal(t[n[len("model."):] + ".weight"], mod.weight), n
            assert n in qc["modules_to_not_convert"]
        assert not [k for k in t if k.startswith("visual.") and not k.endswith(
            (".weight", ".bias"))]
        ref = tiny_qwen2_5_vl()
        with torch.no_grad():
            for n, mod in ref.named_modules():
                if isinstance(mod, torch.nn.Linear) and n.startswith("model.language_model."):
                    mod.weight.copy_(fake_quant_int4_asym(mod.weight, 64, mode="awq"))
        q = T.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            out, device_map="cpu", dtype=torch.float16,
            quantization_config=T.AwqConfig(bits=4, group_size=64, backend="torch_awq"))
        kinds = {{type(mod).__name__ for n, mod in q.named_modules() if "visual" in n}}
        assert "AwqTorchLinear" not in kinds, kinds
        kern = type(q.model.language_model.layers[0].mlp.up_proj).__name__
        g = torch.Generator().manual_seed(1)
        pix = torch.randn(16, 3 * 2 * 14 * 14, generator=g).half()  # 4x4 patches -> 4 tokens
        ids = torch.tensor([[1, 2, 502] + [500] * 4 + [3, 4, 5]])
        kw = dict(input_ids=ids, pixel_values=pix, image_grid_thw=torch.tensor([[1, 4, 4]]))
        with torch.no_grad():
            want, got, flt = ref(**kw).logits.float(), q(**kw).logits.float(), m(**kw).logits
        print("RESULT", kern, float((got - want).abs().max()),
              float((flt.float() - want).abs().max()))
        """), timeout=300)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    _, kern, diff, quant_effect = line[0].split()
    assert kern == "AwqTorchLinear"
    # fp16 rounding of another kernel, far below what quantizing the decoder changed
    assert float(diff) <= 2e-3 and float(quant_effect) > 20 * float(diff), line

    # vLLM (0.34, by its source; not run here): Qwen2.5-VL's hf_to_vllm_mapper rewrites
    # each entry, then a layer is skipped when an entry is a substring of its name, a
    # fused one (q/k/v, gate/up) when all its shards are (some but not all: refused)
    def to_vllm(n):
        for a, b in (("model.language_model.", "language_model.model."),
                     ("model.visual.", "visual."), ("lm_head.", "language_model.lm_head."),
                     ("model.", "language_model.model.")):
            if n.startswith(a):
                return b + n[len(a):]
        return n

    qc = json.load(open(tmp_path / "awq" / "config.json"))["quantization_config"]
    assert "visual" in qc["modules_to_not_convert"]  # (the tower's bare name too)
    for entries in (qc["modules_to_not_convert"], ["visual"]):
        pats = [to_vllm(p) for p in entries]
        layers: dict = {}
        for n, mod in _tiny_qwen2_5_vl().named_modules():
            if isinstance(mod, nn.Linear) and n != "lm_head":
                v = to_vllm(n)
                pre, _, last = v.rpartition(".")
                fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}.get(last)
                layers.setdefault(f"{pre}.{fused}" if fused else v, []).append(v)
        skipped = set()
        for layer, shards in layers.items():
            hits = {any(p in sh for p in pats) for sh in shards}
            assert len(hits) == 1, (layer, shards)  # vLLM: "some but not all shards"
            if hits.pop():
                skipped.add(layer)
        assert skipped == {v for v in layers if v.startswith("visual.")}, sorted(skipped)


def test_vlm_qat_with_awq_filter_exports_from_its_directory(tmp_path, capsys):
    """awq_filter leaves a VLM's vision tower out of QAT (before, prepare
    refused its 172-wide MLP); the export keeps those plain Linears fp16 and
    the text decoder exact, from the model and from a save_pretrained
    directory alike; a tower layer trained with fake quant (the user's own
    filter) exports as trained."""
    _need("transformers")
    from torchao.quantization import quantize_

    from ao_awq_export.__main__ import main
    from ao_awq_export.qat import AWQQATConfig, QATLinear, awq_filter, export_qat_awq

    m = _tiny_qwen2_5_vl()
    quantize_(m, AWQQATConfig(scheme="fp8_int4", mode="awq", group_size=64), filter_fn=awq_filter)
    kinds = {n: type(mod) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert [n for n, k in kinds.items() if k is QATLinear] == \
        [n for n in kinds if n.startswith("model.language_model.")]
    rep = export_qat_awq(m, str(tmp_path / "ref"), progress=False)
    assert rep.all_exact and len(rep.layers) == 14
    ref, _ = read_export(str(tmp_path / "ref"))
    m.save_pretrained(str(tmp_path / "ck"))
    assert main(["export", str(tmp_path / "ck"), str(tmp_path / "cli"), "--scheme", "fp8_int4",
                 "--mode", "awq", "--group-size", "64", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "14 quantized layers (14 bit-exact), 12 Linears kept in float16" in cap.out, cap
    got, _ = read_export(str(tmp_path / "cli"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    # a tower layer trained with fake quant is the user's choice: exported quantized, exact
    qkv = m.model.visual.blocks[0].attn.qkv
    m.model.visual.blocks[0].attn.qkv = FakeQuantLinear.from_linear(
        qkv, scheme="fp8_int4", mode="awq", group_size=64)
    rep = export_qat_awq(m, str(tmp_path / "tower"), progress=False)
    assert rep.all_exact and "model.visual.blocks.0.attn.qkv" in [l.name for l in rep.layers]
    t, _ = read_export(str(tmp_path / "tower"))
    assert torch.equal(awq_dequant(t, "visual.blocks.0.attn.qkv", 64, torch.float16),
                       ao_awq_export.fake_quant_fp8_int4(qkv.weight.detach(), 64, mode="awq"))
    qc = json.load(open(tmp_path / "tower" / "config.json"))["quantization_config"]
    assert not [p for p in qc["modules_to_not_convert"] if p in "visual.blocks.0.attn.qkv"]


def test_config_that_ties_an_untied_head_is_corrected(tmp_path, caplog):
    """config.json saying tie_word_embeddings while lm_head holds other values
    than the embedding (untied in training) would make every consumer use the
    embedding as lm_head: it is written untied, with a warning."""
    _need("transformers")
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    m = T.LlamaForCausalLM(cfg).half().eval()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    out = str(tmp_path / "tied")
    export_awq(m, out, group_size=32, progress=False)
    t, _ = read_export(out)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
    assert "lm_head.weight" not in t
    # a separate but equal copy: still tied, nothing to say
    m.lm_head.weight = nn.Parameter(m.model.embed_tokens.weight.detach().clone())
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(m, str(tmp_path / "copy"), group_size=32, progress=False)
    assert json.load(open(tmp_path / "copy" / "config.json"))["tie_word_embeddings"] is True
    assert "written untied" not in caplog.text
    with torch.no_grad():
        m.lm_head.weight[0, 0] += 1
    _check_written_untied(m, str(tmp_path / "untied"), caplog, m.lm_head.weight)


def _check_written_untied(m, out, caplog, head):
    """export m: warned, config untied, lm_head written as `head` beside the
    embedding."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(m, out, group_size=32, progress=False)
    assert "written untied" in caplog.text
    t, _ = read_export(out)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    assert torch.equal(t["lm_head.weight"], head.detach())
    assert torch.equal(t["model.embed_tokens.weight"], m.model.embed_tokens.weight.detach())


def test_peft_adapter_layers_are_refused(tmp_path):
    """A LoRA layer (peft's lora.Linear: the Linear as base_layer beside
    lora_A / lora_B) would be written as `<name>.base_layer.*` with its
    adapter dropped: refused, saying to merge first."""
    class Linear(nn.Module):  # the shape of peft.tuners.lora.layer.Linear
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 4, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(4, base.out_features, bias=False)})

    Linear.__module__ = "peft.tuners.lora.layer"
    m = Tiny()
    m.up = Linear(m.up)
    with pytest.raises(ValueError, match=r"up: a PEFT adapter layer \(Linear over Linear\); "
                                         r"merge the adapters"):
        export_awq(m, str(tmp_path / "o"), group_size=32, progress=False)
    assert leftovers(tmp_path) == []


def test_heads_that_compute_other_values_than_the_embedding_are_written_untied(tmp_path,
                                                                                caplog):
    """A tied model whose lm_head is fake-quantized (QAT took it) or an
    Int4Tensor (torchao's default filter takes it) computes with other values
    than the embedding: both are written, lm_head as what it computed with,
    and every config that says tied (a VLM's text_config too) says untied."""
    _need("transformers")
    import transformers as T
    torch.manual_seed(0)

    def llama():
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, tie_word_embeddings=True)).half().eval()

    m = llama()
    m.lm_head = FakeQuantLinear.from_linear(m.lm_head, group_size=32)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    _check_written_untied(m, str(tmp_path / "fq"), caplog, m.lm_head.fake_quant_weight())

    m = llama()
    m.lm_head = _int4_tensor_linear(m.lm_head.weight.detach().float(), 32)
    m.lm_head.half()
    out = str(tmp_path / "int4")
    export_awq(m, out, group_size=32, progress=False)
    t, _ = read_export(out)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    assert "lm_head.weight" in t and not torch.equal(t["lm_head.weight"],
                                                     t["model.embed_tokens.weight"])

    v = _tiny_llava(tie=True).half().eval()
    v.lm_head.weight = nn.Parameter(v.lm_head.weight.detach().clone() + 1)
    out = str(tmp_path / "llava")
    export_awq(v, out, group_size=32, progress=False,
               modules_to_not_convert=["vision_tower", "multi_modal_projector"])
    c = json.load(open(os.path.join(out, "config.json")))
    assert c["tie_word_embeddings"] is False and c["text_config"]["tie_word_embeddings"] is False


def test_relative_names_never_match_a_fused_quantized_layer(tmp_path):
    """SGLang and older vLLM match modules_to_not_convert against the names of
    the layers they fuse (`...self_attn.qkv_proj`, `...mlp.gate_up_proj`): a
    vision tower kept in fp16 whose blocks have `attn.qkv` must not add the
    relative name `attn.qkv`, which those would find in the language model's
    quantized qkv_proj."""
    m = _blocks(2)
    m.visual = nn.Module()
    m.visual.blocks = _stack(2, "attn", qkv=(64, 192), proj=(64, 64))
    out = str(tmp_path / "o")
    rep = export_awq(m, out, group_size=32, progress=False, modules_to_not_convert=["visual"])
    skips = json.load(open(os.path.join(out, "config.json")))["quantization_config"][
        "modules_to_not_convert"]
    assert skips == rep.modules_to_not_convert + ["attn.proj", "visual"]
    quantized = [l.name for l in rep.layers]
    fused = sorted({q.rpartition(".")[0] + ".qkv_proj" for q in quantized
                    if q.endswith(("q_proj", "k_proj", "v_proj"))} |
                   {q.rpartition(".")[0] + ".gate_up_proj" for q in quantized
                    if q.endswith(("gate_proj", "up_proj"))})
    assert "model.layers.0.self_attn.qkv_proj" in fused
    assert not [f for f in fused + quantized if any(p in f for p in skips)]


def test_hook_reparametrized_weights_are_refused_even_when_excluded(tmp_path, caplog):
    """torch.nn.utils.prune and the old hook-based weight_norm keep
    weight_orig / weight_mask (weight_g / weight_v) in the state dict and
    compute the weight at each forward: named in modules_to_not_convert, such a
    layer was written without a `.weight` no consumer could load."""
    from torch.nn.utils import prune

    for how, fix in (("prune", "torch.nn.utils.prune.remove"),
                     ("weight_norm", "torch.nn.utils.remove_weight_norm")):
        m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32))
        if how == "prune":
            prune.l1_unstructured(m[0], "weight", 0.5)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.utils.weight_norm(m[0])
        for skip in (None, ["0"]):
            with pytest.raises(ValueError, match=rf"^0: weight is .*{re.escape(fix)}\(module, "
                                                 r"'weight'\)"):
                export_awq(m, str(tmp_path / "o"), group_size=32, progress=False,
                           modules_to_not_convert=skip)
        assert leftovers(tmp_path) == []


def test_strict_message_says_what_was_compared(tmp_path):
    m = nn.Sequential(FakeQuantLinear(64, 32, group_size=32))
    m[0].weight_fake_quant_enabled = False
    with pytest.raises(ValueError, match=r"against the weights the model computes with is below "
                                         r"sqnr_threshold=30.0 dB \(its weight fake quant is "
                                         r"disabled"):
        export_awq(m, str(tmp_path / "o"), group_size=32, progress=False, strict=True)


def test_missing_model_type_and_hf_config_paths(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(nn.Sequential(nn.Linear(64, 32)), str(tmp_path / "o"), group_size=32,
                   progress=False)
    assert "config.json gets no model_type (no hf_config" in caplog.text
    torch.save(nn.Sequential(nn.Linear(64, 32)).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="no such directory or config.json"):
        ex.load_for_export(str(tmp_path / "sd.pt"), str(tmp_path / "nope"))
    # a pattern naming what it accepts in fp16 (not a Linear) is no typo
    caplog.clear()
    m = nn.Sequential(nn.Linear(64, 32))
    m.add_module("experts", nn.Module())
    m.experts.w = nn.Parameter(torch.zeros(2, 4, 4))
    with caplog.at_level("WARNING", logger="ao_awq_export.export"):
        export_awq(m, str(tmp_path / "o2"), group_size=32, progress=False,
                   modules_to_not_convert=["experts", "typo_here"])
    assert "['typo_here'] match no module or parameter" in caplog.text


class _Experts(nn.Module):
    def __init__(self, n, stacked=False):
        super().__init__()
        if stacked:  # gpt-oss style: one 3-D weight for all experts
            self.gate_up_proj = nn.Parameter(torch.randn(n, 64, 128) * 0.02)
        else:
            for i in range(n):
                e = nn.Module()
                e.w1, e.w2 = nn.Linear(64, 128), nn.Linear(128, 64)
                self.add_module(str(i), e)


def _moe(stacked=False):
    m = nn.Module()
    m.model = nn.Module()
    m.model.layers = nn.ModuleList()
    for _ in range(2):
        b = nn.Module()
        b.self_attn = nn.Module()
        b.self_attn.o_proj = nn.Linear(64, 64)
        b.mlp = nn.Module()
        b.mlp.experts = _Experts(2, stacked)
        m.model.layers.append(b)
    return m


def test_moe_experts_in_fp16_are_named_as_vllm_fuses_them(tmp_path):
    """vLLM and SGLang build a MoE layer's experts as one FusedMoE named
    `<...>.experts`, which they look up by substring: experts kept in fp16 are
    listed under that name too; some experts of a layer in fp16 and others
    quantized is refused (one precision per FusedMoE); fused 3-D expert stacks
    accepted in fp16 are listed by their module."""
    out = str(tmp_path / "a")
    rep = export_awq(_moe(), out, group_size=32, progress=False,
                     modules_to_not_convert=["layers.1.mlp"])
    skips = json.load(open(os.path.join(out, "config.json")))["quantization_config"][
        "modules_to_not_convert"]
    assert "model.layers.1.mlp.experts" in skips and "model.layers.0.mlp.experts" not in skips
    quantized = [l.name for l in rep.layers]
    assert "model.layers.0.mlp.experts.0.w1" in quantized
    assert not [q for q in quantized + ["model.layers.0.mlp.experts"]
                if any(p in q for p in skips)]
    out = str(tmp_path / "b")
    export_awq(_moe(), out, group_size=32, progress=False, modules_to_not_convert=["experts"])
    skips = json.load(open(os.path.join(out, "config.json")))["quantization_config"][
        "modules_to_not_convert"]
    assert "mlp.experts" in skips  # every block: the relative name, for AutoAWQ too
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts: 2 expert layers .* would "
                                         r"stay float16 while 2 are quantized"):
        export_awq(_moe(), str(tmp_path / "c"), group_size=32, progress=False,
                   modules_to_not_convert=["layers.0.mlp.experts.0."])
    out = str(tmp_path / "d")
    export_awq(_moe(stacked=True), out, group_size=32, progress=False,
               modules_to_not_convert=["experts"])
    skips = json.load(open(os.path.join(out, "config.json")))["quantization_config"][
        "modules_to_not_convert"]
    assert {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts", "mlp.experts"} <= \
        set(skips)
    assert leftovers(tmp_path) == ["a", "b", "d"]


def test_remote_code_files_and_their_relative_imports_are_copied(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "foo", "auto_map": {}}')
    (hf / "modeling_foo.py").write_text("from .helper_foo import x\nimport torch\n")
    (hf / "helper_foo.py").write_text("from .deeper import y\nx = 1\n")
    (hf / "deeper.py").write_text("y = 2\n")
    (hf / "processing_foo.py").write_text("import .helper_foo\n")
    (hf / "train.py").write_text("not copied")
    out = str(tmp_path / "o")
    export_awq(nn.Sequential(nn.Linear(64, 32)), out, group_size=32, progress=False,
               hf_config=str(hf))
    assert sorted(f for f in os.listdir(out) if f.endswith(".py")) == [
        "deeper.py", "helper_foo.py", "modeling_foo.py", "processing_foo.py"]


def test_old_spectral_norm_is_refused_and_embed_out_twins_say_tied(tmp_path):
    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32))
    torch.nn.utils.spectral_norm(m[1])
    with pytest.raises(ValueError, match=r"^1: weight is spectral-normed .*remove_spectral_norm"):
        export_awq(m, str(tmp_path / "o"), group_size=32, progress=False,
                   modules_to_not_convert=["1"])

    class NeoX(nn.Module):  # a tied output embedding not named lm_head
        def __init__(self):
            super().__init__()
            self.embed_in = nn.Embedding(96, 64)
            self.body = nn.Linear(64, 64)
            self.embed_out = nn.Linear(64, 96, bias=False)
            self.embed_out.weight = self.embed_in.weight

        def get_output_embeddings(self):
            return self.embed_out

        def get_input_embeddings(self):
            return self.embed_in

    out = str(tmp_path / "neox")
    export_awq(NeoX(), out, group_size=32, progress=False, hf_config={"model_type": "x"})
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
    t, _ = read_export(out)
    assert "embed_in.weight" in t and "embed_out.weight" not in t


def test_relative_names_avoid_the_shards_of_real_fused_modules(tmp_path):
    """A language model with real fused modules (Phi-3's `qkv_proj`), which
    vLLM may expand to shard names (`...self_attn.q_proj`), beside an fp16
    vision tower whose blocks have q/k/v_proj: the tower's relative names
    `self_attn.q_proj` would match those shards, so they are not added."""
    m = nn.Module()
    m.model = nn.Module()
    m.model.layers = _stack(2, "self_attn", qkv_proj=(64, 192), o_proj=(64, 64))
    m.visual = nn.Module()
    m.visual.layers = _stack(2, "self_attn", **{p: (64, 64) for p in
                                                ("q_proj", "k_proj", "v_proj", "out_proj")})
    out = str(tmp_path / "o")
    rep = export_awq(m, out, group_size=32, progress=False, modules_to_not_convert=["visual"])
    skips = json.load(open(os.path.join(out, "config.json")))["quantization_config"][
        "modules_to_not_convert"]
    assert "self_attn.out_proj" in skips
    assert not {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} & set(skips)
    shards = [f"model.layers.{i}.self_attn.{p}" for i in range(2)
              for p in ("q_proj", "k_proj", "v_proj")]
    assert not [q for q in shards + [l.name for l in rep.layers] if any(p in q for p in skips)]
