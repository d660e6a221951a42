"""Device and numeric-precision choices shared by training and inference.

CPU is the default target. Whether bfloat16 autocast pays off on a CPU cannot be read from its feature
flags: on the 2-core AVX-512-BF16 machine samplan is developed on, oneDNN reports native bf16, yet a 2048^2
matmul runs at 260 GFLOP/s in fp32 and 158 in bf16, and a U-Net training step is slower in bf16 (Hippocampus
plan, batch 7: 6.2 s fp32 vs 7.1 s bf16; demo plan 3.6 s vs 4.0 s; measured 2026-12-02). So `auto` on the
CPU times one small matmul in both precisions once per process and picks bf16 only when it is clearly
faster (AMX CPUs). Under autocast, weights, optimiser state and losses stay float32 either way.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from functools import lru_cache
from typing import ContextManager

import torch

from samplan.errors import SamplanError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu; an explicit device must be available."""
    if isinstance(spec, torch.device):
        return spec
    spec = str(spec).lower()
    if spec not in DEVICES:
        raise SamplanError(f"unknown device {spec!r}; use one of {', '.join(DEVICES)}.")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if spec == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (spec == "cuda" and not cuda) or (spec == "mps" and not mps):
        raise SamplanError(f"--device {spec} was requested but torch reports no {spec.upper()} device; use --device cpu or auto.")
    return torch.device(spec)


# bf16 must beat fp32 by this factor in the probe to be chosen: a tie is not worth the lost precision
BF16_MIN_SPEEDUP = 1.25
_PROBE_N = 1024


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bfloat16 natively on this CPU (otherwise bf16 is emulated and slower)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _best_matmul_seconds(dtype: torch.dtype, n: int = _PROBE_N, tries: int = 5) -> float:
    """Fastest of `tries` n x n matmuls in `dtype` on the CPU (after one warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """Measured fp32 / bf16 matmul time on this CPU (0.0 without native bf16); about 20 ms, once per process."""
    if not cpu_has_native_bf16():
        return 0.0
    return _best_matmul_seconds(torch.float32) / _best_matmul_seconds(torch.bfloat16)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = plain float32).

    auto: float16 on CUDA; on the CPU bfloat16 when a probe measures it at least BF16_MIN_SPEEDUP times
    faster than float32 (see the module docstring), else float32; float32 on MPS.
    """
    if precision not in PRECISIONS:
        raise SamplanError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise SamplanError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU.")
        return torch.float16
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP:
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """An autocast context for `device` in `dtype`, or a no-op for float32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
