"""How much does int4 round to nearest hurt a model the demo's recipe trains?

Trains examples/qat_to_awq.py's Llama in float and, at each evaluation step,
prints the held-out perplexity of the float model and the relative damage of
int4_asym (mode "awq") round to nearest at group sizes 32/64/128 (embed_tokens
and lm_head stay float).  This is the sweep behind README's "Model size,
honestly" paragraph, e.g.

    python tools/ptq_damage_sweep.py --hidden 256 --steps 900 --evals 300,600,900
    python tools/ptq_damage_sweep.py --hidden 192 --steps 1200 --evals 600,1200 --init 0.002
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import qat_to_awq as demo  # noqa: E402

from ao_awq_export.ops import fake_quant_int4_asym  # noqa: E402


def rtn(model, g):
    """A copy of `model` whose Linears, lm_head aside, hold their int4 round-to-
    nearest weights (int4_asym, mode "awq": what the AWQ file stores)."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                mod.weight.copy_(fake_quant_int4_asym(mod.weight, g, mode="awq"))
    return q


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--evals", default="300,600,900", help="steps at which to evaluate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=float, default=0.02, help="LlamaConfig.initializer_range")
    ap.add_argument("--text", choices=("pydoc", "stdlib"), default="pydoc")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.log_every = max(1, a.steps // 6)
    train, held, unit = demo.load_text(a)
    data = demo.batches(train, a.steps, a.batch, a.seq, a.seed + 1)
    model = demo.build_model(a)
    if a.init != model.config.initializer_range:
        model.config.initializer_range = a.init
        torch.manual_seed(a.seed)
        model.apply(model._init_weights)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.wd, betas=(0.9, 0.95))
    t0, done = time.time(), 0
    for step in sorted(map(int, a.evals.split(","))):
        demo.train(model, opt, data, done, step, a, "float")
        done = step
        ppl = demo.perplexity(model, held, a.seq)
        cells = []
        for g in (32, 64, 128):
            if a.hidden % g:
                cells.append(f"g{g}    n/a")
                continue
            q = rtn(model, g)
            cells.append(f"g{g} {100 * (demo.perplexity(q, held, a.seq) / ppl - 1):+.2f}%")
        print(f"width {a.hidden} x {a.layers}, step {step}, {time.time() - t0:.0f}s: float "
              f"{unit} perplexity {ppl:.4f}; int4 RTN " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
