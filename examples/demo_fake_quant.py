"""Fake-quantize one Linear layer's weight with each scheme and mode and print
the error against the float weight, and check the AWQ modes' export is exact."""
import torch

import ao_awq_export as aq


def sqnr(ref, x):
    ref, x = ref.float(), x.float()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum())).item()


def main():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4096, 1024, bias=False).to(torch.bfloat16)
    w = layer.weight.detach()
    print(f"Linear 4096 -> 1024, bf16 weight, group 128, torch {torch.__version__}, "
          f"CUDA kernels built: {aq.ops.HAS_CUDA}")
    print(f"{'scheme':<10} {'mode':<8} {'SQNR dB':>8} {'max |err|':>10}  exact AWQ export")
    for scheme, fn in (("fp8_int4", aq.fake_quant_fp8_int4), ("int4_asym", aq.fake_quant_int4_asym)):
        for mode in ("torchao", "awq"):
            fq = fn(w, 128, mode=mode)
            codes, scales, zeros = aq.quantize_int4(w, 128, scheme=scheme, mode=mode)
            if scheme == "int4_asym" and mode == "torchao":
                exact = "no (float zero point)"
            else:
                # what an AWQ checkpoint holds: integer codes and zeros, fp16 scales
                deq = ((codes.float().view(1024, -1, 128) - zeros.float().unsqueeze(-1))
                       * scales.float().unsqueeze(-1)).view_as(w).to(w.dtype)
                exact = "yes, bit for bit" if torch.equal(deq, fq) else "NO"
            err = (fq.float() - w.float()).abs().max().item()
            print(f"{scheme:<10} {mode:<8} {sqnr(w, fq):8.2f} {err:10.5f}  {exact}")


if __name__ == "__main__":
    main()
