"""Device and autocast-precision choice: explicit settings are obeyed, `auto` on the CPU follows the measured probe."""
from __future__ import annotations

import pytest
import torch

from samplan import devices
from samplan.errors import SamplanError

CPU = torch.device("cpu")


def test_explicit_precisions() -> None:
    assert devices.autocast_dtype(CPU, "fp32") is None
    assert devices.autocast_dtype(CPU, "bf16") is torch.bfloat16
    with pytest.raises(SamplanError, match="fp16 needs a CUDA device"):
        devices.autocast_dtype(CPU, "fp16")
    with pytest.raises(SamplanError, match="unknown precision"):
        devices.autocast_dtype(CPU, "fp8")


@pytest.mark.parametrize("speedup, expected", [(0.0, None), (0.6, None), (1.1, None), (1.3, torch.bfloat16), (3.0, torch.bfloat16)])
def test_auto_on_cpu_follows_the_probe(monkeypatch: pytest.MonkeyPatch, speedup: float, expected: torch.dtype | None) -> None:
    monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: speedup)
    assert devices.autocast_dtype(CPU, "auto") is expected


def test_probe_measures_this_cpu() -> None:
    """The probe returns a positive ratio where oneDNN has native bf16 and 0 where it has not, and is cached."""
    devices.cpu_bf16_speedup.cache_clear()
    ratio = devices.cpu_bf16_speedup()
    if devices.cpu_has_native_bf16():
        assert 0.05 < ratio < 50.0
    else:
        assert ratio == 0.0
    assert devices.cpu_bf16_speedup() == ratio  # cached: measured once per process


def test_auto_autocast_context_is_a_no_op_in_fp32() -> None:
    a = torch.randn(8, 8)
    with devices.autocast(CPU, None):
        assert (a @ a).dtype == torch.float32
    with devices.autocast(CPU, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
