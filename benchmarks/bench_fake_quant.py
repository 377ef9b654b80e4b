"""Fake-quant speed: our C/CUDA ops vs torchao eager vs torch.compile(torchao),
measured in the same process, medians, printed as ratios.

    python benchmarks/bench_fake_quant.py                 # CPU, 4096^2 and 8192^2 bf16
    python benchmarks/bench_fake_quant.py --device cuda   # + 8192x28672, bandwidth vs copy
    python benchmarks/bench_fake_quant.py --quick         # 4096^2 only, fewer reps

fp8_rows is the fp8 activation fake quant (per row) on a tensor of the same
shape, against torchao's Float8FakeQuantizer (PerRow).

Targets (issue 2 / 3): CPU >= 5x torchao eager; CUDA forward >= 85 % of
device-to-device copy bandwidth, >= 10x torchao eager, >= 1.5x compiled
torchao, backward <= 1.2x forward time.

On CUDA the fp8_int4 kernels stage each row in shared memory where it fits
(one read of the weight); the rows marked "unstaged" time the same op with
AOQ_CUDA_STAGE=0, the kernels that read the row again from global memory.
The rows marked "general code" time it with AOQ_CUDA_FAST=0: every row and
group through the kernels' general code, without the fast paths.  On CUDA
a last table times ours alone at group sizes 32-256 (8192^2).
"""
import argparse
import os
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")
import ao_awq_export as aq  # noqa: E402
from torchao.quantization.qat.fake_quantize_config import Int4WeightFakeQuantizeConfig  # noqa: E402
from torchao.quantization.qat.fake_quantizer import Int4WeightFakeQuantizer  # noqa: E402
from torchao.quantization.qat.fake_quantize_config import Float8FakeQuantizeConfig  # noqa: E402
from torchao.quantization.qat.fake_quantizer import Float8FakeQuantizer  # noqa: E402
from torchao.quantization.granularity import PerRow  # noqa: E402

ACT = {"fp8_int4": torch.float8_e4m3fn, "int4_asym": torch.bfloat16}
OURS = {"fp8_int4": lambda x: aq.fake_quant_fp8_int4(x, 128), "int4_asym": lambda x: aq.fake_quant_int4_asym(x, 128),
        "fp8_rows": aq.fake_quant_fp8_rows}
SCH = {"fp8_int4": 0, "int4_asym": 1}


def timeit(fn, device, reps, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def with_env(fn, var):
    """fn run with the CUDA switch `var` (read at each launch) set to 0:
    AOQ_CUDA_STAGE (the fp8 kernels' shared-memory staging) or AOQ_CUDA_FAST
    (the fast paths of the forward and backward)"""
    def run():
        before = os.environ.get(var)
        os.environ[var] = "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[var]
            else:
                os.environ[var] = before
    return run


def fwd_bwd(fn, w, gout):
    def run():
        x = w.detach().requires_grad_()
        fn(x).backward(gout)
        return x.grad
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev = args.device
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (8192, 8192)]
    if dev == "cuda" and not args.quick:
        shapes.append((8192, 28672))
    reps = (5 if args.quick else 10) if dev == "cpu" else 50
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# device: {name}; torch {torch.__version__}; bf16 weights, group 128; median of {reps}")
    hdr = "| shape | op | ours ms | torchao eager ms | compiled torchao ms | x eager | x compiled |"
    if dev == "cuda":
        hdr += " GB/s | % of copy |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for n, k in shapes:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        gout = torch.randn_like(w)
        nbytes = w.numel() * w.element_size()
        copy_t = timeit(lambda: torch.empty_like(w).copy_(w), dev, reps) if dev == "cuda" else None
        # fp8_rows: the fp8 activation fake quant (per row), on a tensor of
        # the same shape (n tokens of k features), against torchao's
        # Float8FakeQuantizer (PerRow)
        for scheme in ("fp8_int4", "int4_asym", "fp8_rows"):
            if scheme == "fp8_rows":
                tao = Float8FakeQuantizer(Float8FakeQuantizeConfig(torch.float8_e4m3fn, PerRow()))
                bwd = lambda: torch.ops.ao_awq.fp8_rows_backward(gout, w, aq.ops.CLAMP_STRICT)  # noqa: E731
            else:
                tao = Int4WeightFakeQuantizer(Int4WeightFakeQuantizeConfig(group_size=128,
                                                                           activation_dtype=ACT[scheme]))
                bwd = lambda s=scheme: torch.ops.ao_awq.fq_weight_backward(  # noqa: E731
                    gout, w, 128, SCH[s], False, aq.ops.CLAMP_STRICT)
            ours = OURS[scheme]
            comp = None if args.no_compile else torch.compile(tao)
            rows = [
                ("fwd", lambda: ours(w), lambda: tao(w), (lambda: comp(w)) if comp is not None else None, 2 * nbytes),
                ("fwd+bwd", fwd_bwd(ours, w, gout), fwd_bwd(tao, w, gout),
                 fwd_bwd(comp, w, gout) if comp is not None else None, 5 * nbytes),
                ("bwd kernel", bwd, None, None, 3 * nbytes),
            ]
            if dev == "cuda":
                rows += [("fwd general code", with_env(lambda: ours(w), "AOQ_CUDA_FAST"), None, None, 2 * nbytes),
                         ("bwd kernel general code", with_env(bwd, "AOQ_CUDA_FAST"), None, None, 3 * nbytes)]
            if dev == "cuda" and scheme != "int4_asym":
                rows += [("fwd unstaged", with_env(lambda: ours(w), "AOQ_CUDA_STAGE"), None, None, 2 * nbytes),
                         ("bwd kernel unstaged", with_env(bwd, "AOQ_CUDA_STAGE"), None, None, 3 * nbytes)]
            t_fwd = None
            for op, f_ours, f_tao, f_comp, bts in rows:
                t_o = timeit(f_ours, dev, reps)
                t_e = timeit(f_tao, dev, max(3, reps // 3)) if f_tao else None
                t_c = None
                if f_comp:
                    try:
                        t_c = timeit(f_comp, dev, max(3, reps // 3), warmup=3)
                    except Exception as e:  # noqa: BLE001
                        print(f"# torch.compile(torchao) failed: {type(e).__name__}: {e}")
                if op == "fwd":
                    t_fwd = t_o
                fmt = lambda t: f"{t * 1e3:.3f}" if t else "-"  # noqa: E731
                rat = lambda t: f"{t / t_o:.1f}x" if t else "-"  # noqa: E731
                line = f"| {n}x{k} | {scheme} {op} | {fmt(t_o)} | {fmt(t_e)} | {fmt(t_c)} | {rat(t_e)} | {rat(t_c)} |"
                if dev == "cuda":
                    gbs = bts / t_o / 1e9
                    copy_bw = 2 * nbytes / copy_t / 1e9
                    line += f" {gbs:.0f} | {100 * gbs / copy_bw:.0f}% |"
                if op.startswith("bwd kernel"):
                    line += f" (bwd/fwd = {t_o / t_fwd:.2f})"
                print(line, flush=True)
        if dev == "cuda":
            print(f"# device-to-device copy of {nbytes / 1e6:.0f} MB: {2 * nbytes / copy_t / 1e9:.0f} GB/s (read+write)")
    if dev == "cuda" and not args.quick:
        # the other group sizes, ours only (last: a run cut short loses these
        # first); g = 256's int4_asym backward keeps one block per SM (about
        # 200 registers per thread at 256 threads)
        n, k = 8192, 8192
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        gout = torch.randn_like(w)
        nbytes = w.numel() * w.element_size()
        copy_bw = 2 * nbytes / timeit(lambda: torch.empty_like(w).copy_(w), dev, reps) / 1e9
        print("| shape | op | group | ours ms | GB/s | % of copy | bwd/fwd |")
        print("|---|---|---|---|---|---|---|")
        for g in (32, 64, 128, 256):
            for scheme, fn in (("fp8_int4", aq.fake_quant_fp8_int4),
                               ("int4_asym", aq.fake_quant_int4_asym)):
                t_f = timeit(lambda: fn(w, g), dev, reps)
                t_b = timeit(lambda: torch.ops.ao_awq.fq_weight_backward(
                    gout, w, g, SCH[scheme], False, aq.ops.CLAMP_STRICT), dev, reps)
                for op, t, bts in (("fwd", t_f, 2 * nbytes), ("bwd kernel", t_b, 3 * nbytes)):
                    gbs = bts / t / 1e9
                    print(f"| {n}x{k} | {scheme} {op} | {g} | {t * 1e3:.3f} | {gbs:.0f} | "
                          f"{100 * gbs / copy_bw:.0f}% | {t_b / t_f:.2f} |", flush=True)


if __name__ == "__main__":
    main()
