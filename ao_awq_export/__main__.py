"""Command line: python -m ao_awq_export export CHECKPOINT OUT_DIR [options]

CHECKPOINT is a transformers model directory (save_pretrained's, a Trainer
checkpoint: its config.json, generation config and tokenizer files are
used unless --hf-config names others), a torch.save'd nn.Module (needs
--allow-pickle: unpickling runs code from the file) or a state dict (with
--hf-config DIR, built into the transformers model that config
describes).  OUT_DIR must not exist or be empty.  Exit status 0 on success, 1 on an export or load error (message on
stderr), 2 on invalid arguments (argparse's usage error), 3 when --strict
refuses a layer.
"""
from __future__ import annotations

import argparse
import math
import os
import sys


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    p = argparse.ArgumentParser(prog="ao-awq-export" if script.startswith("ao-awq-export")
                                else "python -m ao_awq_export",
                                description="Lossless AWQ int4 export of torchao QAT models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write an AWQ GEMM checkpoint (safetensors + config.json)")
    e.add_argument("checkpoint", help="transformers model directory (save_pretrained), or a "
                   "torch.save'd model or state dict")
    e.add_argument("out_dir", help="new output directory (must not exist or be empty)")
    e.add_argument("--scheme", default=None, choices=("int4_asym", "fp8_int4"),
                   help="scheme for plain nn.Linear layers (default int4_asym)")
    e.add_argument("--mode", default=None, choices=("awq", "torchao"),
                   help="numerics for plain nn.Linear layers (default awq: exact)")
    e.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128),
                   help="group size of plain Linears (default: that of the model's own "
                        "quantized layers, QAT, FakeQuantLinear, Int4Tensor or converted, "
                        "else 128)")
    e.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB (decimal), 2GiB")
    e.add_argument("--hf-config", metavar="DIR",
                   help="directory with the model's config.json (and generation_config.json, "
                        "tokenizer files); default: CHECKPOINT when it is a directory")
    e.add_argument("--modules-to-not-convert", default="",
                   help="comma-separated substrings of Linear names to keep in float16")
    e.add_argument("--strict", action="store_true",
                   help="fail if a layer's SQNR vs its fake-quant weight is below the threshold")
    e.add_argument("--sqnr-threshold", type=float, default=None, help="dB (default 30)")
    e.add_argument("--allow-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (executes code from the file)")
    e.add_argument("--no-act-scales", action="store_true",
                   help="leave out AutoAWQ's ScaledActivation scales (bloom, falcon, gpt_neox, "
                        "gptj, gpt_bigcode, mpt, starcoder2): vLLM refuses them, transformers "
                        "needs them")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _has_own_quantized_layers(model) -> bool:
    """QAT / FakeQuantLinear / converted layers or torchao Int4Tensor weights,
    which export with their own settings."""
    import torch.nn as nn

    from .export import FakeQuantLinear, _is_int4_tensor

    return any(isinstance(m, FakeQuantLinear) or hasattr(m, "qweight")
               or (isinstance(m, nn.Linear) and _is_int4_tensor(m.weight))
               for m in model.modules())


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    from .export import (DEFAULT_SQNR_THRESHOLD, check_out_dir, export_awq, load_for_export,
                         parse_size)

    # invalid values exit 2, as argparse's own errors do
    try:
        parse_size(args.max_shard_size)
    except (ValueError, TypeError) as e:
        parser.error(f"--max-shard-size: {e}")
    if args.sqnr_threshold is not None and math.isnan(args.sqnr_threshold):
        parser.error("--sqnr-threshold must be a number, got nan")
    try:
        check_out_dir(args.out_dir)  # before a possibly long load
        try:
            model = load_for_export(args.checkpoint, args.hf_config,
                                    allow_pickle=args.allow_pickle,
                                    progress=not args.no_progress)
        except OSError as e:
            if e.filename is not None:
                raise  # already worded, with its path (a missing file, ...)
            why = f"{type(e).__name__}: {e}"  # a bare errno from torch.load: a truncated file
            print(f"error: {args.checkpoint}: cannot read the checkpoint (not a complete "
                  f"torch.save file?): {why[:200]}", file=sys.stderr)
            return 1
        except (ValueError, TypeError, ImportError):
            raise  # already worded (missing tensors, ...)
        except Exception as e:  # noqa: BLE001  (whatever a corrupt file makes torch.load raise)
            import pickle

            if (isinstance(e, pickle.UnpicklingError) and not args.allow_pickle
                    and "Unsupported global" in str(e)):
                print(f"error: {args.checkpoint} holds pickled objects (a whole model?); "
                      "re-run with --allow-pickle if you trust the file", file=sys.stderr)
                return 1
            why = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"error: {args.checkpoint}: cannot read the checkpoint (not a complete "
                  f"torch.save file?): {type(e).__name__}: {why}", file=sys.stderr)
            return 1
        hf_config = args.hf_config
        if hf_config is None and os.path.isdir(args.checkpoint):
            hf_config = args.checkpoint  # its config, generation config and tokenizer files
        mods = [m.strip() for m in args.modules_to_not_convert.split(",") if m.strip()]
        defaulted = [f for f, v in (("--scheme", args.scheme), ("--mode", args.mode),
                                    ("--group-size", args.group_size)) if v is None]
        if defaulted and not _has_own_quantized_layers(model):
            # float weights (a model directory, a state dict): nothing in them says how
            # the model was trained, and another grid would quietly not be the QAT model
            print(f"note: {args.checkpoint} holds float weights only, no QAT settings: its "
                  f"Linears are rounded to nearest with scheme {args.scheme or 'int4_asym'}, "
                  f"mode {args.mode or 'awq'}, group size "
                  f"{args.group_size or 128}; for a QAT-trained model pass the training's "
                  f"{', '.join(defaulted)} (the export then holds the codes QAT trained: "
                  "bit for bit in mode awq, see README)",
                  file=sys.stderr)
        qat = sys.modules.get(__package__ + ".qat")  # imported by unpickling QAT modules
        if qat is not None and any(isinstance(m, (qat.QATLinear, qat.AWQInt4Linear))
                                   for m in model.modules()):
            # a prepared or converted model: its layers' group size, checked
            export, gs = qat.export_qat_awq, ({} if args.group_size is None
                                              else {"group_size": args.group_size})
        else:
            export, gs = export_awq, {"group_size": args.group_size}
        rep = export(model, args.out_dir, scheme=args.scheme or "int4_asym",
                     mode=args.mode or "awq", **gs,
                     max_shard_size=args.max_shard_size, modules_to_not_convert=mods or None,
                     hf_config=hf_config, strict=args.strict,
                     sqnr_threshold=(DEFAULT_SQNR_THRESHOLD if args.sqnr_threshold is None
                                     else args.sqnr_threshold),
                     progress=not args.no_progress, act_scales=not args.no_act_scales)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if args.strict and "SQNR" in str(e) else 1
    except (OSError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_exact = sum(l.exact for l in rep.layers)
    worst = rep.min_sqnr_db
    print(f"wrote {rep.out_dir}: {len(rep.files)} files, {rep.total_size / 1e6:.1f} MB of tensors, "
          f"{len(rep.layers)} quantized layers ({n_exact} bit-exact"
          + ("" if math.isinf(worst) else f", lowest SQNR {worst:.2f} dB") + ")"
          + (f", {len(rep.modules_to_not_convert)} Linears kept in float16"
             if rep.modules_to_not_convert else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
