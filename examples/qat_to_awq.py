"""End to end on CPU: train a small Llama, then compare post-training int4
quantization (PTQ, round to nearest) with quantization-aware training (QAT,
our fake-quant ops through torchao's quantize_), both exported as AWQ GEMM
checkpoints and evaluated after loading those checkpoints back.

    python examples/qat_to_awq.py            # 2.3 M parameters, 4-5 minutes on 2 CPU cores
    python examples/qat_to_awq.py --quick    # a few seconds (smoke test)
    python examples/qat_to_awq.py --hf-check # also load the checkpoints with
                                             # transformers + GPTQModel (real AWQ consumer)
    python examples/qat_to_awq.py --preset small  # 0.25 M parameters, bytes, 3-4 minutes

Text (no download): with the default preset ("2m") the standard library's
top-level modules (`--text stdlib`: about 168 files, 4 MB) in a 16384-token
byte-level BPE trained here on the training documents only (`tokenizers`,
installed with transformers); with `--preset small` the Python reference
documentation that ships with CPython (`--text pydoc`, `pydoc_data.topics`:
about 79 documents, 465 k characters) with UTF-8 bytes as tokens.  Documents
are split by index: every 8th (sorted by name) is held out for evaluation,
the rest is training text.  The numbers depend on the Python version (the
texts differ between versions).

The comparison is fair by construction: the float model is trained for
`steps` steps; QAT branches off the float checkpoint at step `steps -
qat_steps` (same weights, same optimizer state) and sees the very same
batches and learning rates for its last `qat_steps` steps, only with int4
fake-quantized weights (int4_asym, mode "awq": integer zeros and fp16 scales,
exactly what the AWQ checkpoint stores).  The learning rate warms up, follows
a cosine to the branch point, and then decays linearly to zero over those
last steps, in both runs.  PTQ quantizes the final float model
with round to nearest.  The quantized models are evaluated from the exported
files, through a loader written here from the AWQ format description (it
does not use ao_awq_export).

Presets (each sets the text, vocabulary, group size and step counts; the
explicit options override them):

* "2m" (default): width 64, 4 layers, 2.3 M parameters the way
  TinyStories-style models reach them: a 0.21 M-parameter body with a
  16384-token vocabulary (embed_tokens and lm_head, which stay fp16 in the
  AWQ file); group size 64, 1200 steps, QAT for the last 400.  Most of the
  time goes into the lm_head, whose training matmuls run in bfloat16 (mixed
  precision: fp32 weights, softmax and gradients; `--head-dtype fp32` for
  full fp32, about 1.5x slower).
* "small": the same body with bytes as tokens (0.25 M parameters); group size
  32, 2400 steps, QAT for the last 800.

Wider bodies (widths 128-256, 1-3.5 M parameters) trained for a few minutes
are so undertrained that int4 costs them under 0.5 %, with a sign that varies
between group sizes: a "recovery" measured against that is noise.  At this
size one run's recovery moves by tens of points with the seed, and even with
float rounding differences: README reports several seeds, and
docs/demo_notes.md the other settings tried.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_docs(which):
    """The documents of a text that ships with CPython, sorted by name."""
    if which == "pydoc":
        import pydoc_data.topics as topics

        return [topics.topics[n] for n in sorted(topics.topics)]
    import glob
    import sysconfig

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    docs = []
    for fn in files:
        with open(fn, encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    return docs


def load_text(args):
    """(train ids, held-out ids, unit, tokenizer or None): every 8th document is
    held out.  Tokens are UTF-8 bytes (vocab 256) or, for vocab > 256, a
    byte-level BPE trained here (`tokenizers`, installed with transformers) on
    the training part only."""
    docs = load_docs(args.text)
    train = [d for i, d in enumerate(docs) if i % 8 != 7]
    held = [d for i, d in enumerate(docs) if i % 8 == 7]
    if args.vocab == 256:
        enc = lambda ds: torch.frombuffer(bytearray("\n\n".join(ds).encode("utf-8")),  # noqa
                                          dtype=torch.uint8).to(torch.long)
        return enc(train), enc(held), "byte", None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # (decoding only: the ids are the same)
    tok.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=args.vocab, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    enc = lambda ds: torch.tensor([i for e in tok.encode_batch(ds) for i in e.ids],  # noqa
                                  dtype=torch.long)
    return enc(train), enc(held), "BPE token", tok


def batches(data, n, batch, seq, seed):
    """n deterministic batches of random windows [batch, seq + 1]."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (n, batch), generator=g)
    idx = starts.unsqueeze(-1) + torch.arange(seq + 1)
    return data[idx]


# --------------------------------------------------------------------------
# model, training, evaluation
# --------------------------------------------------------------------------
def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                      num_key_value_heads=args.hidden // 32, max_position_embeddings=args.seq,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def _warmup_cosine(step, lr, steps):
    """Linear warmup over steps // 20, then a cosine to 0.1 x lr at `steps`."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def lr_at(step, args):
    """The warmup + cosine up to the QAT branch point, then, over the last
    `qat_steps` steps (the float and QAT runs alike), linear decay from there
    to zero.  Without `args.qat_steps` (tools/ptq_damage_sweep.py), the plain
    warmup + cosine."""
    tail = getattr(args, "qat_steps", 0) or 0
    branch = args.steps - tail
    if tail and step >= branch:
        return _warmup_cosine(branch, args.lr, args.steps) * (args.steps - step) / tail
    return _warmup_cosine(step, args.lr, args.steps)


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ w.T, y)) without the [tokens, vocab] logits: rows
    are taken `chunk` at a time and, the loss being the last op, the gradients
    of h and w are computed right there (backward only scales them).  With a
    16384-token vocabulary the logits are 134 MB per step (and as much again
    for their gradient); a chunk of 256 rows is 16 MB, allocated and freed in
    turn.  One fused softmax per chunk gives both the gradient (softmax minus
    one-hot) and the loss (-log of the target's probability; rows where that
    underflows are redone through logsumexp): on this project's CPU 16 ms per
    2048 x 16384 logits, against 62 ms for logsumexp, subtract and exp.  `mm_dtype` is the dtype of the three matmuls'
    operands and of the logits (default: h's dtype; bfloat16 for mixed
    precision: the softmax, the loss and the gradients' accumulation stay in
    h's dtype).  By default it is the unfused loss and gradients up to
    float rounding."""

    @staticmethod
    def forward(ctx, h, w, y, chunk, mm_dtype=None):
        n, mm_dtype = h.shape[0], mm_dtype or h.dtype
        hm, wm = h.detach().to(mm_dtype), w.detach().to(mm_dtype)
        gh, gw = torch.empty_like(h), torch.zeros_like(w)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        rows = torch.arange(min(chunk, n), device=h.device)
        for i in range(0, n, chunk):
            hc, yc = hm[i:i + chunk], y[i:i + chunk]
            r = rows[: hc.shape[0]]
            z = torch.softmax(hc @ wm.t(), -1, dtype=h.dtype)
            nll = -z[r, yc].log()
            bad = nll.isinf()
            if bad.any():  # the target's probability underflowed: redo those rows
                zb = (hc[bad] @ wm.t()).to(h.dtype)
                nll[bad] = torch.logsumexp(zb, -1) - zb.gather(1, yc[bad, None]).squeeze(1)
            total += nll.sum(dtype=torch.float64)
            z[r, yc] -= 1.0                               # d(sum of losses)/dz
            z.mul_(1.0 / n)
            if mm_dtype == h.dtype:
                torch.mm(z, wm, out=gh[i:i + chunk])
                gw.addmm_(z.t(), hc)
            else:
                z = z.to(mm_dtype)
                gh[i:i + chunk] = z @ wm
                gw += z.t() @ hc
        ctx.save_for_backward(gh, gw)
        return (total / n).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        gh, gw = ctx.saved_tensors
        return gh * grad, gw * grad, None, None, None


def lm_loss(model, xy, chunk=256, mm_dtype=None):
    """Next-token cross entropy of a LlamaForCausalLM on a [batch, seq + 1] batch."""
    head = model.lm_head
    assert type(head) is torch.nn.Linear and head.bias is None, head  # kept float, no bias
    h = model.model(input_ids=xy[:, :-1]).last_hidden_state
    h = h.reshape(-1, h.shape[-1])
    return LinearCrossEntropy.apply(h, head.weight, xy[:, 1:].reshape(-1), chunk, mm_dtype)


def train(model, opt, data, first, last, args, tag):
    model.train()
    t = time.time()
    for step in range(first, last):
        xy = data[step]
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args)
        loss = lm_loss(model, xy, mm_dtype=getattr(args, "head_mm_dtype", None))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == first or (step + 1) % args.log_every == 0 or step + 1 == last:
            log(f"{tag} step {step + 1:4d}/{args.steps}  loss {loss.item():.4f}  "
                f"({(time.time() - t) / (step + 1 - first):.2f} s/step)")
    model.eval()


@torch.no_grad()
def perplexity(model, held, seq, dtype=None):
    """exp(mean next-byte NLL) over non-overlapping windows of the held-out text."""
    model.eval()
    n = (held.numel() - 1) // seq
    x = held[: n * seq].view(n, seq)
    y = held[1: n * seq + 1].view(n, seq)
    nll, cnt = 0.0, 0
    for i in range(0, n, 32):
        logits = model(input_ids=x[i:i + 32]).logits.float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + 32].reshape(-1),
                               reduction="sum").item()
        cnt += y[i:i + 32].numel()
    return math.exp(nll / cnt)


# --------------------------------------------------------------------------
# an independent AWQ GEMM reader (from the format description, no project code)
# --------------------------------------------------------------------------
AWQ_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # logical column j sits at bits 4*AWQ_ORDER[j]


def unpack_awq(packed):
    """int32 [R, C/8] -> int64 [R, C]."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    cols = [(p >> (4 * AWQ_ORDER[j])) & 0xF for j in range(8)]
    return torch.stack(cols, dim=-1).reshape(packed.shape[0], -1)


def load_awq_reference(path, build):
    """A float32 model whose quantized Linears hold w[n,k] = (q - z) * s read
    from the AWQ checkpoint in `path`."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["bits"] == 4 and qc["version"] == "gemm", qc
    g = qc["group_size"]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    sd = {}
    for fn in files:
        sd.update(load_file(os.path.join(path, fn)))
    out, nq = {}, 0
    for k, v in sd.items():
        if k.endswith(".qweight"):
            base = k[: -len("qweight")]
            q = unpack_awq(v)                                   # [K, N]
            z = unpack_awq(sd[base + "qzeros"])                 # [K/g, N]
            assert sd[base + "scales"].dtype == torch.float16
            s = sd[base + "scales"].to(torch.float32)           # [K/g, N]
            w = (q.to(torch.float32) - z.repeat_interleave(g, 0).to(torch.float32)) \
                * s.repeat_interleave(g, 0)
            out[base + "weight"] = w.t().contiguous()
            nq += 1
        elif k.endswith((".qzeros", ".scales")):
            continue
        else:
            out[k] = v.to(torch.float32)
    model = build()
    model.load_state_dict(out, strict=True)
    return model.eval(), nq


def load_awq_transformers(path):
    """Load through transformers' AWQ integration (GPTQModel CPU kernel)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu",
                                                dtype=torch.float16).eval()


# --------------------------------------------------------------------------
# text, vocabulary, int4 group size, total steps, QAT steps (the last ones)
PRESETS = {
    "2m": dict(text="stdlib", vocab=16384, group_size=64, steps=1200, qat_steps=400),
    "small": dict(text="pydoc", vocab=256, group_size=32, steps=2400, qat_steps=800),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run for tests (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="total training steps")
    ap.add_argument("--qat-steps", type=int, default=None, help="last steps done with QAT")
    ap.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128),
                    help="int4 group size (default: the preset's, 64 or 32)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", choices=("pydoc", "stdlib"), default=None,
                    help="pydoc_data.topics (465 k chars) or the stdlib's top-level modules "
                         "(4 MB); default: the preset's")
    ap.add_argument("--vocab", type=int, default=None,
                    help="256: bytes; larger: a byte-level BPE of that size trained here; "
                         "default: the preset's")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="2m",
                    help="2m (default): width 64, BPE 16384 on the stdlib sources, 2.3 M "
                         "parameters, group size 64, 1200 steps (4-5 minutes); small: width 64, "
                         "bytes of pydoc_data, 0.25 M parameters, group size 32, 2400 steps "
                         "(3-4 minutes)")
    ap.add_argument("--head-dtype", choices=("fp32", "bf16"), default=None,
                    help="dtype of the lm_head's matmuls in training (mixed precision; weights, "
                         "softmax and gradients stay fp32): default bf16 with a BPE vocabulary, "
                         "fp32 with bytes")
    ap.add_argument("--out", default=None, help="directory for the two exports (kept)")
    ap.add_argument("--hf-check", action="store_true",
                    help="also evaluate through transformers + GPTQModel (its first use may "
                         "JIT-compile a CPU kernel: minutes)")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.seq, args.batch = 2, 64, 8
        args.steps = args.steps or 12
        args.qat_steps = args.qat_steps or 6
    for k, v in PRESETS[args.preset].items():  # what the options left unset
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.head_dtype = args.head_dtype or ("fp32" if args.vocab == 256 else "bf16")
    args.head_mm_dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[args.head_dtype]
    if args.vocab < 256:
        ap.error("--vocab must be 256 (bytes) or larger (a byte-level BPE)")
    if not 0 < args.qat_steps <= args.steps - max(1, args.steps // 20):
        ap.error("need 0 < --qat-steps <= --steps - warmup (--steps // 20): QAT branches "
                 "off after the warmup")
    args.log_every = max(1, args.steps // 6)

    if args.hf_check:  # before the training, not after it
        try:
            import gptqmodel  # noqa: F401  (transformers' AWQ loading on the CPU)
            import transformers  # noqa: F401
        except ImportError as e:
            ap.error(f"--hf-check needs transformers and GPTQModel ({e}): pip install -c "
                     ".ci/constraints.txt -r requirements-test.txt && pip install --no-deps -r "
                     "requirements-test-nodeps.txt")

    from torchao.quantization import quantize_

    from ao_awq_export.export import export_awq
    from ao_awq_export.qat import AWQInt4Linear, AWQQATConfig, awq_filter, export_qat_awq

    torch.manual_seed(args.seed)
    train_data, held, unit, tok = load_text(args)
    if args.quick:
        held = held[: 64 * 20 + 1]
    text = "pydoc_data.topics" if args.text == "pydoc" else "stdlib *.py"
    log(f"text: CPython {sys.version.split()[0]} {text}, {train_data.numel():,} training "
        f"{unit}s, {held.numel():,} held-out {unit}s; torch threads {torch.get_num_threads()}")
    data = batches(train_data, args.steps, args.batch, args.seq, args.seed + 1)

    model = build_model(args)
    nparam = sum(p.numel() for p in model.parameters())
    nbody = sum(p.numel() for n, p in model.named_parameters()
                if "embed_tokens" not in n and "lm_head" not in n)
    log(f"Llama: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{nparam / 1e6:.2f} M parameters ({nbody / 1e6:.2f} M outside embed_tokens/lm_head); "
        f"{args.steps} steps of {args.batch}x{args.seq} {unit}s, QAT for the last "
        f"{args.qat_steps}; int4_asym, group size {args.group_size}; lm_head matmuls in "
        f"{args.head_dtype} during training")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd,
                            betas=(0.9, 0.95))

    # (1) float training up to the branch point, then on to the end
    branch = args.steps - args.qat_steps
    train(model, opt, data, 0, branch, args, "float")
    qat_model = copy.deepcopy(model)
    qat_opt = torch.optim.AdamW(qat_model.parameters(), lr=args.lr, weight_decay=args.wd,
                                betas=(0.9, 0.95))
    qat_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, data, branch, args.steps, args, "float")

    out_root = args.out or tempfile.mkdtemp(prefix="qat_to_awq_")
    try:
        ptq_dir, qat_dir = os.path.join(out_root, "ptq_awq"), os.path.join(out_root, "qat_awq")
        for d in (ptq_dir, qat_dir):
            if os.path.exists(d):
                shutil.rmtree(d)

        # the exports' config.json and tokenizer files (vLLM reads the tokenizer
        # from the checkpoint directory): a directory as save_pretrained writes them
        hf_dir = os.path.join(out_root, "hf_config")
        shutil.rmtree(hf_dir, ignore_errors=True)
        model.config.save_pretrained(hf_dir)
        if tok is not None:
            from transformers import PreTrainedTokenizerFast
            PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(hf_dir)

        # (2) PTQ: round-to-nearest AWQ export of the float model (lm_head stays fp16)
        rep = export_awq(model, ptq_dir, scheme="int4_asym", mode="awq",
                         group_size=args.group_size, hf_config=hf_dir, progress=False)
        log(f"PTQ export: {len(rep.layers)} int4 layers -> {ptq_dir}")

        # (3) QAT from the float checkpoint at the branch point, with our fake quant
        qcfg = dict(scheme="int4_asym", mode="awq", group_size=args.group_size)
        keys = list(qat_model.state_dict())
        quantize_(qat_model, AWQQATConfig(**qcfg, step="prepare"), filter_fn=awq_filter)
        assert list(qat_model.state_dict()) == keys  # same Parameters, same keys
        train(qat_model, qat_opt, data, branch, args.steps, args, "QAT  ")

        # (4) convert (integer codes, zeros, fp16 scales) and export
        probe = held[: args.seq].unsqueeze(0)
        with torch.no_grad():
            ref_logits = qat_model(input_ids=probe).logits
        quantize_(qat_model, AWQQATConfig(**qcfg, step="convert"), filter_fn=None)
        with torch.no_grad():
            same = torch.equal(ref_logits, qat_model(input_ids=probe).logits)
        rep = export_qat_awq(qat_model, qat_dir, hf_config=hf_dir, progress=False)
        shutil.rmtree(hf_dir, ignore_errors=True)
        log(f"QAT convert: forward identical to the prepared model: {same}; export: "
            f"{len(rep.layers)} int4 layers, all exact: {rep.all_exact} -> {qat_dir}")

        # (5) evaluate; the quantized models come back from the exported files
        ppl_float = perplexity(model, held, args.seq)
        ptq_model, n1 = load_awq_reference(ptq_dir, lambda: build_model(args))
        qat_loaded, n2 = load_awq_reference(qat_dir, lambda: build_model(args))
        ppl_ptq = perplexity(ptq_model, held, args.seq)
        ppl_qat = perplexity(qat_loaded, held, args.seq)
        with torch.no_grad():  # the file gives back the converted model's weights
            file_eq = all(torch.equal(m.dequantize().float(),
                                      qat_loaded.get_submodule(n).weight)
                          for n, m in qat_model.named_modules() if isinstance(m, AWQInt4Linear))
        log(f"loaded {n1} + {n2} int4 layers with the reference AWQ reader; QAT file weights "
            f"== converted weights: {file_eq}")

        rows = [("float (fp32)", ppl_float), ("PTQ  int4 RTN (AWQ file)", ppl_ptq),
                ("QAT  int4 (AWQ file)", ppl_qat)]
        if args.hf_check:
            log("transformers + GPTQModel: loading both checkpoints (fp16) ...")
            p1 = perplexity(load_awq_transformers(ptq_dir), held, args.seq)
            p2 = perplexity(load_awq_transformers(qat_dir), held, args.seq)
            rows += [("PTQ  via transformers/GPTQModel", p1), ("QAT  via transformers/GPTQModel", p2)]
        deg = ppl_ptq - ppl_float
        rec = (ppl_ptq - ppl_qat) / deg if deg > 0 else float("nan")
        print()
        print(f"held-out {unit} perplexity (group size {args.group_size}, int4_asym, "
              f"{held.numel():,} {unit}s; {nparam / 1e6:.2f} M parameters)")
        print(f"| {'model':<34} | {'perplexity':>10} | {'vs float':>9} |")
        print(f"|{'-' * 36}|{'-' * 12}|{'-' * 11}|")
        for name, p in rows:
            print(f"| {name:<34} | {p:10.4f} | {100 * (p / ppl_float - 1):+8.2f}% |")
        print(f"QAT recovers {100 * rec:.1f} % of PTQ's perplexity degradation "
              f"((ppl_ptq - ppl_qat) / (ppl_ptq - ppl_float))")
        print(f"exports kept in {out_root}" if args.out else
              "(the exports were written to a temporary directory, removed now; keep them "
              "with --out DIR)")
    finally:  # the temporary exports go, also when a step fails
        if not args.out:
            shutil.rmtree(out_root, ignore_errors=True)
    log("done")
    return dict(float=ppl_float, ptq=ppl_ptq, qat=ppl_qat, recovery=rec, convert_equal=same,
                file_equal=file_eq, exact=rep.all_exact, head_dtype=args.head_dtype)


def _reexec_with_malloc_settings():
    """glibc hands every freed block above its mmap threshold (at most 32 MB)
    back to the kernel and gets fresh zeroed pages for the next one.  Before
    the training loss was chunked (LinearCrossEntropy), that was 40 % of
    `--preset 2m`'s CPU time (logits of 16 x 128 x 16384 floats, and their
    gradient); the evaluation's logits are still that large.  The two
    variables below keep such blocks in the heap; they must be set before the
    interpreter starts, hence the re-exec.  Set MALLOC_MMAP_THRESHOLD_
    yourself (any value) to skip it."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 30),
               MALLOC_TRIM_THRESHOLD_=str(1 << 32))
    argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    _reexec_with_malloc_settings()
    main()
