"""Data-sheet facts about accelerator chips, in a module that imports nothing heavy (the
accelerator benchmark's driver reads it without starting JAX)."""
from __future__ import annotations

# Dense bf16 peaks (TFLOP/s, no sparsity) by JAX's `device_kind`, for MFU.
PUBLISHED_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,       # H100 SXM
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,                 # v5e
    "TPU v5": 459.0,                      # v5p
    "TPU v6 lite": 918.0,                 # v6e (Trillium)
}


def published_peak_flops(device_kind: str) -> float:
    """The chip's data-sheet dense bf16 peak in FLOP/s, 0.0 when `PUBLISHED_BF16_TFLOPS` does
    not know it (CPUs, other chips)."""
    return PUBLISHED_BF16_TFLOPS.get(device_kind, 0.0) * 1e12
