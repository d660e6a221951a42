"""Which engine runs a frozen image encoder at prediction: eager torch, or its ONNX Runtime copy where that is faster.

On the 2-core development CPU ONNX Runtime ran LiteMedSAM's encoder about 3x faster than eager torch in float32
with the same outputs (see benchmarks/README.md, encoder_engines.py). The Predictor chooses the engine for the
cases it predicts (`encoder_engine`); encoding code asks `prediction_encoder` for the callable to use, and outside
a Predictor (training) that is always the module itself. "onnx" uses ONNX Runtime on the CPU; "auto" does so only
when onnxruntime is installed and a one-time probe on this machine (cached per encoder architecture and input
size) measured it faster. The first use of an export in a process compares it with one eager forward: outside
`TOLERANCE` the export is rebuilt once, then the encoder runs eagerly, with a note.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from samplan.errors import SamplanError
from samplan.models import onnx_encoder as ox
from samplan.utils import load_json, save_json

ENGINES = ("auto", "torch", "onnx")
ENV_VAR = "SAMPLAN_ENCODER_ENGINE"  # the default of --encoder-engine / Predictor(encoder_engine=None)
TOLERANCE = 1e-3  # max abs difference from the eager encoder's output
MIN_SPEEDUP = 1.1  # auto: ONNX Runtime must beat eager torch by this factor (the export costs seconds to minutes)
EXPORT_BATCH = 1  # rows per ONNX call: LiteMedSAM ran 3.4 s/slice at batch 1, 6.1 s/slice at batch 4 (2 cores)
_KEPT_SESSIONS = 4  # verified sessions kept per process (one per fold's encoder weights; each holds its weights)

_ENGINE: ContextVar[str] = ContextVar("samplan_encoder_engine", default="torch")
_SESSIONS: "OrderedDict[str, ox.OnnxEncoder | None]" = OrderedDict()  # export key -> verified session, None = eager
_PROBED: dict[str, str] = {}  # probe key -> "onnx" | "torch", as read from or written to the cache


def resolve_engine(name: str | None, device: torch.device, autocast_dtype: torch.dtype | None = None) -> str:
    """The engine a Predictor uses: `name` (None: $SAMPLAN_ENCODER_ENGINE, else "auto") checked; "auto" becomes
    "torch" off the CPU, under autocast or without onnxruntime. "onnx" there is a SamplanError saying what to do."""
    name = (name or os.environ.get(ENV_VAR) or "auto").lower()
    if name not in ENGINES:
        raise SamplanError(f"unknown encoder engine {name!r} (from --encoder-engine or {ENV_VAR}); use one of "
                           f"{', '.join(ENGINES)}.")
    if name == "onnx":
        ox.require_onnxruntime()
        if device.type != "cpu":
            raise SamplanError(f"--encoder-engine onnx runs the image encoder with ONNX Runtime on the CPU, but the "
                               f"device is {device.type}; use --encoder-engine torch (or auto) there.")
        if autocast_dtype is not None:
            raise SamplanError(f"--encoder-engine onnx runs in float32, but the precision is "
                               f"{str(autocast_dtype).replace('torch.', '')}; use --precision fp32 or auto, or "
                               "--encoder-engine torch.")
    # under bf16 autocast the eager encoder is about as fast as ONNX Runtime in fp32 or faster (LiteMedSAM 0.72 vs
    # 0.69 s/slice, ViT-B 0.30 vs 0.53 on the development CPU), and its outputs are bf16's: auto keeps torch there
    if name == "auto" and (device.type != "cpu" or autocast_dtype is not None or ox.onnx_missing() is not None):
        return "torch"
    return name


def engine_and_autocast(name: str | None, device: torch.device, precision: str = "auto"
                        ) -> tuple[str, torch.dtype | None]:
    """(encoder engine, autocast dtype) of a prediction run: an explicit "onnx" engine makes precision "auto" float32
    (ONNX Runtime runs the encoder in float32; bf16 elsewhere would only blur what the user asked to compare)."""
    from samplan.devices import autocast_dtype

    asked = (name or os.environ.get(ENV_VAR) or "auto").lower()
    dtype = None if asked == "onnx" and precision == "auto" else autocast_dtype(device, precision)
    return resolve_engine(name, device, dtype), dtype


@contextmanager
def encoder_engine(name: str) -> Iterator[None]:
    """Encoders asked for with `prediction_encoder` inside the block use engine `name` ("auto", "torch", "onnx")."""
    token = _ENGINE.set(name)
    try:
        yield
    finally:
        _ENGINE.reset(token)


def prediction_encoder(module: nn.Module, tag: str = "", weights: nn.Module | None = None
                       ) -> Callable[[torch.Tensor], Any]:
    """What encodes `(B, C, S, S)` float32 inputs at prediction: `module` itself, or, under engine "onnx"/"auto",
    a wrapper that runs its ONNX Runtime copy (same output structure). `tag` names what `module` computes beyond
    its class and weights (e.g. which blocks it returns): part of the export's cache key; `weights`: the module
    that holds its parameters when `module` is a wrapper made per call."""
    engine = _ENGINE.get()
    return module if engine == "torch" else EngineEncoder(module, engine, tag, weights)


class EngineEncoder:
    """Calls `module`'s verified ONNX Runtime copy for CPU float32 inputs without autograd, else `module` itself."""

    def __init__(self, module: nn.Module, engine: str, tag: str = "", weights: nn.Module | None = None):
        self.module, self.engine, self.tag, self.weights = module, engine, tag, weights
        # weights do not change while one case is encoded: hash them once per wrapper and input shape
        self._keys: dict[tuple[int, ...], tuple[Path | None, str]] = {}

    def __call__(self, x: torch.Tensor) -> Any:
        """The module's output(s) for `x` `(B, C, S, S)`."""
        if (self.engine == "torch" or x.device.type != "cpu" or torch.is_grad_enabled() or self.module.training
                or _autocast_on()):
            return self.module(x)
        try:
            probe, key = self._key(tuple(x.shape[1:]))
        except Exception as e:  # e.g. an onnxruntime that is installed but cannot be imported
            print(f"note: the image encoder runs in torch: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
            self.engine = "torch"
            return self.module(x)
        if probe is not None and _probed(probe) == "torch":
            return self.module(x)
        if key not in _SESSIONS or (probe is not None and _SESSIONS[key] is not None and _probed(probe) is None):
            return self._first_use(key, x, probe)
        _SESSIONS.move_to_end(key)
        session = _SESSIONS[key]
        return self.module(x) if session is None else session(x)

    def _key(self, shape: tuple[int, ...]) -> tuple[Path | None, str]:
        """(auto's probe file, else None; the export key) for inputs `(B, *shape)`."""
        if shape not in self._keys:
            probe = None
            if self.engine == "auto":
                probe = ox.cache_root() / f"probe_{probe_key(self.module, shape, self.tag)}.json"
            self._keys[shape] = probe, ox.export_key(self.module, shape, EXPORT_BATCH, self.tag, self.weights)
        return self._keys[shape]

    def _first_use(self, key: str, x: torch.Tensor, probe: Path | None) -> Any:
        """Load or export, verify against eager, and with auto the first time on this machine record the probe."""
        try:
            session = _SESSIONS.get(key) or ox.load_cached(key)
            out, eager_s, onnx_s, err = self._verify(session, x) if session is not None else (None, 0.0, 0.0, 0.0)
            if session is None or err > TOLERANCE:
                if session is not None:
                    print(f"note: the cached ONNX encoder differs from the eager one by {err:.2e}; exporting it "
                          "again", file=sys.stderr)
                    ox.discard(key)
                print(f"note: exporting the image encoder ({type(self.module).__name__}, input "
                      f"{tuple(x.shape[1:])}) to ONNX once, into {ox.cache_root()}", file=sys.stderr, flush=True)
                session = ox.export_encoder(self.module, x[:EXPORT_BATCH].contiguous(), key)
                out, eager_s, onnx_s, err = self._verify(session, x)
        except Exception as e:  # ONNX is an optimisation: whatever fails in it leaves the eager encoder working
            print(f"note: the image encoder runs in torch: its ONNX export failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160] if str(e) else ''})", file=sys.stderr)
            return _remember(key, None, self.module(x))
        if err > TOLERANCE:
            print(f"note: the image encoder runs in torch: its ONNX Runtime output differs from the eager one by "
                  f"{err:.2e} (> {TOLERANCE:g})", file=sys.stderr)
            return _remember(key, None, self.module(x))
        if probe is not None and _probed(probe) is None:
            _write_probe(probe, self.module, eager_s, onnx_s)
        return _remember(key, session, out)  # verified: also this first output is ONNX Runtime's

    def _verify(self, session: ox.OnnxEncoder, x: torch.Tensor) -> tuple[Any, float, float, float]:
        """(ONNX output for all of `x`, eager s and ONNX s for the first chunk, max abs difference on it)."""
        t0 = time.perf_counter()
        chunks = session.run_chunks(x)
        onnx_s = (time.perf_counter() - t0) / len(chunks)
        first = x[:session.batch]
        t0 = time.perf_counter()
        ref = self.module(first)
        eager_s = time.perf_counter() - t0
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = session.join(chunks[:1], first.shape[0])
        got = got if isinstance(got, tuple) else (got,)
        if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
            return None, eager_s, onnx_s, float("inf")
        err = max(float((r.float() - g).abs().max()) for r, g in zip(ref, got))
        return session.join(chunks, x.shape[0]), eager_s, onnx_s, err


def _remember(key: str, session: ox.OnnxEncoder | None, out: Any) -> Any:
    """Keep the verified session of `key` (None: run eagerly), a bounded number per process; pass `out` through."""
    _SESSIONS[key] = session
    while len(_SESSIONS) > _KEPT_SESSIONS:
        _SESSIONS.popitem(last=False)
    return out


def _autocast_on() -> bool:
    try:
        return bool(torch.is_autocast_enabled("cpu"))
    except TypeError:  # older torch: CPU autocast has its own query
        return bool(torch.is_autocast_cpu_enabled())


def probe_key(module: nn.Module, input_shape: tuple[int, ...], tag: str = "") -> str:
    """The key of a speed probe: architecture (class, tag, parameter names and shapes), input, batch, threads,
    versions and CPU; not the weights, which do not change the speed."""
    import onnxruntime

    arch = [(k, list(v.shape), str(v.dtype)) for k, v in module.state_dict().items()]
    what = {"module": f"{type(module).__module__}.{type(module).__qualname__}", "tag": tag, "arch": arch,
            "input": list(input_shape), "batch": EXPORT_BATCH, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "cpu": _cpu_name(),
            "cores": os.cpu_count()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probed(path: Path) -> str | None:
    """auto's recorded choice ("onnx" / "torch") for probe file `path`, or None when there is none (or it is damaged)."""
    if str(path) not in _PROBED:
        try:
            choice = load_json(path).get("choice")
        except Exception:  # missing or damaged: probe again
            return None
        if choice not in ("onnx", "torch"):
            return None
        _PROBED[str(path)] = choice
    return _PROBED[str(path)]


def _write_probe(path: Path, module: nn.Module, eager_s: float, onnx_s: float) -> str:
    """Record which engine was faster for this architecture on this machine (auto's choice from now on)."""
    choice = "onnx" if onnx_s * MIN_SPEEDUP <= eager_s else "torch"
    probe = {"choice": choice, "eager_s": eager_s, "onnx_s": onnx_s, "min_speedup": MIN_SPEEDUP,
             "module": type(module).__name__, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    save_json(probe, path)
    _PROBED[str(path)] = choice
    print(f"note: image encoder {type(module).__name__}: eager {eager_s:.2f} s, ONNX Runtime {onnx_s:.2f} s per "
          f"call of {EXPORT_BATCH}; --encoder-engine auto uses {choice} on this machine (recorded in {path})",
          file=sys.stderr)
    return choice
