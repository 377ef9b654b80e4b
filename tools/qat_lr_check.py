"""Does QAT's learning rate change the recovery, measured fairly?

Trains examples/qat_to_awq.py's model in float once (the demo's recipe and
batches), keeping the state at the QAT branch point, then continues from that
branch point several times over the same batches:

    float:S   the float model at S x the demo's learning rate (float', and the
              int4 round-to-nearest damage of float', "PTQ'")
    qat:S     QAT (int4_asym, mode "awq") at S x the learning rate

and prints held-out perplexities and, for each QAT run, the recovery against
the demo's float run and against every float' run.  Comparing qat:0.5 with
float:1 mixes "QAT" with "a lower learning rate helps at the end anyway";
qat:0.5 against float:0.5 does not.  docs/demo_notes.md's numbers came from

    python tools/qat_lr_check.py --preset 2m --steps 2400 --qat-steps 800 --group-size 32 \
        --runs float:0.5,qat:1,qat:0.5            (and --seed 1)

(about 12 minutes each on 2 cores, half that with the current 2m preset's
1200 steps; quantized models are evaluated in memory, which equals the
exported file in mode "awq").  Those learning-rate figures were taken
before the demo's schedule ended in a linear decay to zero (its cosine ended
at 0.1 x lr then, and the loss was unfused: commit d7a3a3a reproduces them);
this tool uses the demo's current schedule and loss (for
2m: bf16 lm_head matmuls in training, as the demo).
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import qat_to_awq as demo  # noqa: E402

from ptq_damage_sweep import rtn  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=tuple(demo.PRESETS), default="2m")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=None, help="default: the demo preset's")
    ap.add_argument("--qat-steps", type=int, default=None, help="default: the demo preset's")
    ap.add_argument("--group-size", type=int, default=None, help="default: the demo preset's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="float:0.5,qat:1,qat:0.5")
    a = ap.parse_args()
    for k, v in demo.PRESETS[a.preset].items():  # text, vocab, group size, steps as the demo
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.head_mm_dtype = torch.bfloat16 if a.preset == "2m" else torch.float32  # as the demo
    a.log_every = max(1, a.steps // 6)
    from torchao.quantization import quantize_

    from ao_awq_export.qat import AWQQATConfig, awq_filter

    t0 = time.time()
    train, held, _ = demo.load_text(a)
    data = demo.batches(train, a.steps, a.batch, a.seq, a.seed + 1)
    model = demo.build_model(a)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd, betas=(0.9, 0.95))
    branch = a.steps - a.qat_steps
    demo.train(model, opt, data, 0, branch, a, "float")
    b_model, b_opt = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    demo.train(model, opt, data, branch, a.steps, a, "float")
    floats = {1.0: (demo.perplexity(model, held, a.seq),
                    demo.perplexity(rtn(model, a.group_size), held, a.seq))}
    qats = {}
    for run in a.runs.split(","):
        kind, scale = run.split(":")
        scale = float(scale)
        m = copy.deepcopy(b_model)
        o = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=a.wd, betas=(0.9, 0.95))
        o.load_state_dict(copy.deepcopy(b_opt))
        if kind == "qat":
            quantize_(m, AWQQATConfig(scheme="int4_asym", mode="awq", group_size=a.group_size),
                      filter_fn=awq_filter)
        b = copy.copy(a)
        b.lr = a.lr * scale
        demo.train(m, o, data, branch, a.steps, b, f"{kind} x{scale}")
        ppl = demo.perplexity(m, held, a.seq)
        if kind == "qat":
            qats[scale] = ppl
        else:
            floats[scale] = (ppl, demo.perplexity(rtn(m, a.group_size), held, a.seq))
        print(f"[{time.time() - t0:.0f}s] {run}: {ppl:.4f}", flush=True)
    print(f"\n{a.preset}, seed {a.seed}, group size {a.group_size}")
    for s, (pf, pp) in sorted(floats.items()):
        print(f"float x{s}: {pf:.4f}   its int4 RTN: {pp:.4f} ({100 * (pp / pf - 1):+.2f} %)")
        for q, pq in sorted(qats.items()):
            print(f"    QAT x{q}: {pq:.4f}  recovery against float x{s}: "
                  f"{100 * (pp - pq) / (pp - pf):.1f} %")


if __name__ == "__main__":
    main()
