"""ao_awq_export: fast C/CUDA fake-quant ops for torchao QAT, and lossless
export of the trained model as an AWQ int4 checkpoint."""
import torch  # noqa: F401  (loads libtorch before our extension)

from .ops import (  # noqa: F401
    GROUP_SIZES,
    MODES,
    SCHEMES,
    dequantize_int4,
    fake_quant_fp8_int4,
    fake_quant_fp8_rows,
    fake_quant_int4_asym,
    pack_awq,
    quantize_int4,
)

__version__ = "0.1.0"
