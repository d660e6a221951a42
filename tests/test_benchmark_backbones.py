"""Pure helpers of benchmarks/backbones.py: size checks, SDPA FLOP formula, table layout, timing and RSS sampling."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from samplan.models.backbones import backbone_spec

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "backbones.py"
_spec = importlib.util.spec_from_file_location("benchmark_backbones", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("name,size,ok", [
    ("vit_b", 256, True), ("vit_b", 1024, True), ("vit_b", 200, False), ("vit_b", 16, False),
    ("litemedsam", 256, True), ("litemedsam", 128, False),
    ("sam2_hiera_t", 128, True), ("sam2_hiera_t", 1024, True), ("sam2_hiera_t", 208, False),
])
def test_size_problem(name: str, size: int, ok: bool) -> None:
    """Sizes a family supports give None, the others a reason naming the backbone."""
    why = bench.size_problem(backbone_spec(name), size)
    assert (why is None) == ok
    if why is not None:
        assert name in why


def test_sdpa_cpu_flops_matches_two_matmuls() -> None:
    """q@k^T plus p@v, 2 FLOPs per multiply-add, with different key length and value width."""
    b, h, sq, sk, d, dv = 2, 3, 5, 7, 4, 6
    assert bench.sdpa_cpu_flops((b, h, sq, d), (b, h, sk, d), (b, h, sk, dv)) == 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


class _ConvLinearAttention(torch.nn.Module):
    """1x1 conv 3 -> 8 channels, a linear layer on the tokens, then self-attention over them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1, bias=False)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(self.conv(x).flatten(2).transpose(1, 2)).unsqueeze(1)  # (B, 1, tokens, 8)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_encoder_flops_counts_conv_linear_and_sdpa() -> None:
    """Conv, linear and CPU scaled_dot_product_attention FLOPs are all counted, exactly."""
    b, s = 2, 4
    tokens = s * s
    qkv = (b, 1, tokens, 8)
    expected = 2 * b * tokens * 3 * 8 + 2 * b * tokens * 8 * 8 + bench.sdpa_cpu_flops(qkv, qkv, qkv)
    assert bench.encoder_flops(_ConvLinearAttention().eval(), s, b) == expected


def test_precision_context() -> None:
    """fp32 runs without autocast, bf16 under CPU bfloat16 autocast, anything else is refused."""
    a = torch.randn(4, 4)
    with bench.precision_context("fp32"):
        assert (a @ a).dtype == torch.float32
    with bench.precision_context("bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        bench.precision_context("fp16")


def test_time_runs_counts_warmup_and_repeats() -> None:
    """`warmup` untimed calls, then `repeats` non-negative wall times."""
    calls = []
    times = bench.time_runs(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_peak_rss_growth_sees_a_large_allocation() -> None:
    """Touching 200 MB inside the sampled call shows up as growth of at least half of that."""

    def allocate() -> None:
        buf = torch.ones(200 * 2 ** 20 // 4)
        buf += 1
        import time
        time.sleep(0.05)  # give the sampler a few rounds while the buffer is alive
        del buf

    bench.release_memory()
    assert bench.peak_rss_growth(allocate) >= 100 * 2 ** 20


def test_format_table_aligns_columns() -> None:
    """All lines of the table have the same column starts; text left-aligned, numbers right-aligned, None as '-'."""
    rows = [
        {"backbone": "vit_b", "size": 256, "precision": "fp32", "params_m": 89.5, "ms_per_slice": 1234.5,
         "peak_rss_mb": 300.0, "gflop_per_slice": 87.1, "gflops": 70.6, "matmul_gflops": 85.0, "efficiency": 0.83},
        {"backbone": "sam2_hiera_b+", "size": 1024, "precision": "bf16", "params_m": 80.8, "ms_per_slice": 5.0,
         "peak_rss_mb": None, "gflop_per_slice": 1.0, "gflops": 200.0, "matmul_gflops": 45.0, "efficiency": 4.4},
    ]
    lines = bench.format_table(rows).splitlines()
    assert len(lines) == 4 and set(lines[1]) == {"-", " "}
    assert lines[2].startswith("vit_b ") and lines[3].startswith("sam2_hiera_b+")
    assert lines[0].endswith("eff") and lines[2].endswith("83%") and lines[3].endswith("440%")
    assert " - " in lines[3]
    size_col = lines[0].index("size") + len("size")
    assert lines[2][:size_col].endswith(" 256") and lines[3][:size_col].endswith("1024")
