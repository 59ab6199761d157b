"""Model FLOPs utilisation: the arithmetic behind train/mfu_window (also used by benchmarks/gpu_bench.py)."""

from __future__ import annotations

from ftdist.model import numel

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def matmul_params(model) -> int:
    """The N of 6N: parameters outside embedding tables (a table lookup costs no FLOPs)."""
    import torch

    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(numel(p) for p in model.parameters() if id(p) not in tables)


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward 2N + backward 4N) plus attention scores and
    values, 12 * layers * hidden * seq (the PaLM paper's appendix B estimate)."""
    return 6 * n_params + 12 * layers * hidden * seq_len


def mfu(n_params: int, layers: int, hidden: int, seq_len: float, real_tokens_per_s: float, n_devices: int,
        device_name: str) -> float | None:
    """Model FLOPs utilisation on real (non-padding) tokens; None on a device without a known peak."""
    peak = peak_flops(device_name)
    if not peak:
        return None
    return flops_per_token(n_params, layers, hidden, seq_len) * real_tokens_per_s / (n_devices * peak)
