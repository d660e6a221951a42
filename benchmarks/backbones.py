"""CPU speed, memory and FLOPs of the SAM-family image encoders (samplan.models.backbones), one forward per slice.

  python benchmarks/backbones.py                                   # every non-tiny backbone at 256, fp32 + bf16
  python benchmarks/backbones.py --backbones vit_b sam2_hiera_t --sizes 128 256 1024 --precision fp32
  python benchmarks/backbones.py --backbones tiny_vit tiny_litemedsam tiny_sam2 --repeats 2 --json rows.json

Each backbone is built with random weights (speed does not depend on their values), put in eval() and run
under torch.inference_mode on (batch, 3, S, S) inputs; one backbone and size at a time, freed before the next.
Sizes a family cannot take (LiteMedSAM: 256 only; SAM ViT: multiple of 16; SAM2: multiple of 32) are skipped
with a note. The default size is the CPU planning budget (ComputeBudget "cpu" max_sam_input, 256).

Above the table: this machine's best-of-5 GFLOP/s of a 2048x2048 matmul, fp32 and under bf16 autocast.
Columns:
  backbone, size   registry name and input edge S
  prec             fp32, or bf16 = torch.autocast("cpu", bfloat16) around each forward (weights stay fp32)
  params M         parameters of the image encoder, millions
  ms/slice         median forward time over --repeats runs (after --warmup runs), divided by --batch
  peak MB          peak RSS growth of the process during one extra forward: psutil sampled every 2 ms by a
                   background thread, baseline taken after gc.collect() + malloc_trim (peaks < 2 ms may be missed)
  GFLOP/slice      FLOPs of one forward / batch, counted by torch.utils.flop_counter.FlopCounterMode: matmuls,
                   convolutions and attention (SDPA) only, a multiply-add = 2 FLOPs; norms/softmax/GELU not counted;
                   counted once in fp32 (FlopCounterMode's decompositions clash with autocast; same ops in bf16)
  GFLOP/s          achieved: GFLOP/slice / (ms/slice)
  matmul GFLOP/s   the machine's matmul GFLOP/s for the same precision
  eff              efficiency = GFLOP/s / matmul GFLOP/s
--json FILE writes the rows (plus header numbers, per-run times, build time and the skip notes).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.models.backbones import build_image_encoder, build_sam2
from samplan.models.specs import BACKBONES, TINY_BACKBONES, BackboneSpec, backbone_spec

PLANNED_CPU_SIZE = ComputeBudget.for_device("cpu").max_sam_input
SAMPLE_S = 0.002
MATMUL_N = 2048
COLUMNS = [  # (row key, header, format)
    ("backbone", "backbone", "{}"), ("size", "size", "{}"), ("precision", "prec", "{}"),
    ("params_m", "params M", "{:.1f}"), ("ms_per_slice", "ms/slice", "{:.1f}"), ("peak_rss_mb", "peak MB", "{:.0f}"),
    ("gflop_per_slice", "GFLOP/slice", "{:.2f}"), ("gflops", "GFLOP/s", "{:.1f}"),
    ("matmul_gflops", "matmul GFLOP/s", "{:.1f}"), ("efficiency", "eff", "{:.0%}"),
]


def size_problem(spec: BackboneSpec, size: int) -> str | None:
    """Why backbone `spec` cannot take a size x size input, or None when it can."""
    if spec.fixed_input_size and size != spec.native_input_size:
        return f"{spec.name} takes only {spec.native_input_size} (TinyViT fixes its output grid)"
    step = 32 if spec.family == "sam2" else spec.patch_size
    if size % step or size < 2 * step:
        return f"{spec.name} needs a multiple of {step} >= {2 * step}"
    return None


def precision_context(precision: str) -> AbstractContextManager:
    """The autocast context of `precision` ("fp32": none, "bf16": CPU bfloat16 autocast)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")


def sdpa_cpu_flops(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of CPU flash attention (not in torch's table): q@k^T and p@v, each 2*b*h*Sq*Sk*d."""
    b, h, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * sq * sk * (d + dv)


def encoder_flops(encoder: nn.Module, size: int, batch: int) -> int:
    """FlopCounterMode's total for one fp32 forward on a (batch, 3, size, size) input (CPU SDPA added to its table)."""
    x = torch.randn(batch, 3, size, size)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops})
    with torch.inference_mode(), counter:
        encoder(x)
    return int(counter.get_total_flops())


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so RSS growth is meaningful."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS growth may then be understated


def peak_rss_growth(fn: Callable[[], Any], interval: float = SAMPLE_S) -> int:
    """Peak RSS growth (bytes) of this process while `fn` runs, sampled by a background thread."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        peak[0] = max(peak[0], proc.memory_info().rss)
        done.set()
        thread.join()
    return peak[0] - base


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_gflops(precision: str, n: int = MATMUL_N, tries: int = 5) -> float:
    """Best GFLOP/s of an n x n fp32 matmul (under autocast for bf16) over `tries` runs after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def mm() -> None:
        with precision_context(precision):
            torch.mm(a, b)

    with torch.inference_mode():
        return 2 * n ** 3 / min(time_runs(mm, tries, 1)) / 1e9


def build_encoder(name: str, size: int) -> nn.Module:
    """The image encoder of backbone `name` at input size `size`, random weights, eval mode."""
    if backbone_spec(name).family == "sam2":
        model = build_sam2(name, input_size=size)
        encoder = model.image_encoder
        del model  # memory attention, decoder etc. are not benchmarked
    else:
        encoder = build_image_encoder(name, input_size=size)
    return encoder.eval()


def measure(encoder: nn.Module, size: int, precision: str, batch: int, repeats: int, warmup: int,
            flops: int) -> dict[str, Any]:
    """Median time and peak RSS growth of the encoder forward on a (batch, 3, size, size) input; rates from `flops`."""
    x = torch.randn(batch, 3, size, size)

    def forward() -> None:
        with precision_context(precision):
            encoder(x)

    with torch.inference_mode():
        times = time_runs(forward, repeats, warmup)
        release_memory()
        peak = peak_rss_growth(forward)
    sec = statistics.median(times) / batch
    return {"ms_per_slice": 1e3 * sec, "peak_rss_mb": peak / 2 ** 20, "gflop_per_slice": flops / batch / 1e9,
            "gflops": flops / batch / sec / 1e9, "times_ms": [1e3 * t for t in times]}


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    """Rows as plain text: a header, a rule, right-aligned columns (text columns left-aligned)."""
    cells = [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max(len(c) for c in col) for col in zip(heads, *cells)]
    text = {i for i, (k, _, _) in enumerate(columns) if any(isinstance(r.get(k), str) for r in rows)}

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in text else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=[n for n in BACKBONES if n not in TINY_BACKBONES],
                   help="registry names (default: every non-tiny one)")
    p.add_argument("--sizes", nargs="+", type=int, default=[PLANNED_CPU_SIZE], help="input edges S")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5, help="timed forwards (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: cores)")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; return the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [backbone_spec(n).name for n in args.backbones]  # unknown names fail before any work
    matmul = {p: matmul_gflops(p) for p in ("fp32", "bf16")}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.repeats} timed runs after "
          f"{args.warmup} warm-up, random weights, eval() + inference_mode\n"
          f"matmul {MATMUL_N}x{MATMUL_N} (best of 5): fp32 {matmul['fp32']:.1f} GFLOP/s, "
          f"bf16 autocast {matmul['bf16']:.1f} GFLOP/s\npeak MB = peak RSS growth during one forward (psutil, "
          f"2 ms sampling thread); GFLOP = FlopCounterMode (matmul/conv/attention only, counted in fp32)", flush=True)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in names:
        spec = backbone_spec(name)
        for size in args.sizes:
            if (why := size_problem(spec, size)) is not None:
                notes.append(f"skipped {name} at {size}: {why}")
                continue
            print(f"... {name} at {size}", file=sys.stderr, flush=True)  # progress: big models take minutes
            encoder = None
            try:
                t0 = time.perf_counter()
                encoder = build_encoder(name, size)
                build_s = time.perf_counter() - t0
                params = sum(p.numel() for p in encoder.parameters()) / 1e6
                flops = encoder_flops(encoder, size, args.batch)
                for prec in args.precision:
                    row = {"backbone": name, "size": size, "precision": prec, "batch": args.batch,
                           "params_m": params, "build_s": build_s}
                    row |= measure(encoder, size, prec, args.batch, args.repeats, args.warmup, flops)
                    row |= {"matmul_gflops": matmul[prec], "efficiency": row["gflops"] / matmul[prec]}
                    rows.append(row)
            except (SamplanError, RuntimeError, MemoryError) as e:
                notes.append(f"failed {name} at {size}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            finally:
                del encoder
                release_memory()
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    if args.json is not None:
        header = {"torch": torch.__version__, "threads": args.threads, "batch": args.batch, "repeats": args.repeats,
                  "warmup": args.warmup, "matmul_n": MATMUL_N, "matmul_gflops": matmul,
                  "memory": "psutil RSS growth, 2 ms sampling thread", "flops": "FlopCounterMode: matmul/conv/SDPA"}
        args.json.write_text(json.dumps({"header": header, "rows": rows, "notes": notes}, indent=1) + "\n")
    return 0 if rows or not notes else 1


if __name__ == "__main__":
    sys.exit(main())
