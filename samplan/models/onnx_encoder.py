"""ONNX Runtime copies of image encoders: exported once per weights, input shape and versions, cached on disk.

A cached `{key}.onnx` is trusted only when its sidecar `{key}.json` (written after it) records its size and sha256
and the file still has them: a killed export, a half-copied or damaged file is exported again. The key covers the
weights (sha256 of the state dict), what the module computes (its class and a caller's tag), the input shape, the
batch and the torch/onnx versions. Whether the copy equals the eager module is checked by the caller
(samplan.models.encoder_engine) on first use.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from samplan.errors import SamplanError
from samplan.utils import atomic_path, load_json, remove_stale_temporaries, save_json

try:
    import fcntl
except ImportError:  # Windows: concurrent exports of one encoder both write (atomically), nothing worse
    fcntl = None  # type: ignore[assignment]

OPSET = 18
INSTALL_HINT = "pip install 'samplan[onnx]' (or: pip install onnxruntime onnx)"


def onnx_missing() -> str | None:
    """Which of onnxruntime / onnx cannot be imported (None when both can)."""
    missing = [m for m in ("onnxruntime", "onnx") if _find_spec(m) is None]
    return " and ".join(missing) or None


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module set to None in sys.modules (how tests hide a package)
        return None


def require_onnxruntime() -> Any:
    """The onnxruntime module, or one SamplanError naming the fix."""
    missing = onnx_missing()
    try:
        if missing is None:
            import onnxruntime

            return onnxruntime
    except ImportError as e:  # installed but broken (e.g. a wheel for another Python)
        missing = f"onnxruntime ({e})"
    raise SamplanError(f"the ONNX encoder engine needs {missing}, which is not importable: {INSTALL_HINT}; or choose "
                       "--encoder-engine torch (or auto, which uses ONNX Runtime only when it is installed).")


def cache_root() -> Path:
    """Where exported encoders and probe results live: $SAMPLAN_CACHE/onnx_encoders, else ~/.cache/samplan/..."""
    base = os.environ.get("SAMPLAN_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "samplan") / "onnx_encoders"


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and values of `module`'s state dict (memory layout ignored); about
    0.2 s for SAM ViT-B's 87 M parameters on the development CPU (hardware SHA), so it is computed, never guessed."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import onnx

    return {"torch": torch.__version__, "onnx": onnx.__version__, "opset": str(OPSET)}


def export_key(module: nn.Module, input_shape: tuple[int, ...], batch: int, tag: str = "",
               weights: nn.Module | None = None) -> str:
    """The cache key (hex sha256) of `module` exported for inputs `(batch, *input_shape)`; `weights`: the module
    holding its parameters when `module` is a wrapper (only its state is hashed)."""
    what = {"module": f"{type(module).__module__}.{type(module).__qualname__}", "tag": tag,
            "weights": weights_sha256(weights or module), "input": list(input_shape), "batch": int(batch),
            **_versions()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class OnnxEncoder:
    """An InferenceSession of an exported encoder: `(B, *input_shape)` float32 -> the module's tensor(s), float32 CPU.

    The graph has a fixed batch; inputs are run in chunks of it, the last chunk padded with zeros (the padded
    rows are dropped; samples do not interact in an encoder in eval mode).
    """

    def __init__(self, path: Path, batch: int, n_outputs: int, threads: int | None = None):
        ort = require_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: its warnings name graph nodes, nothing a user can act on
        # the mask decoder runs in torch right after each encoder call: spinning ORT threads would take its cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.path, self.batch, self.n_outputs = path, int(batch), int(n_outputs)

    def run_chunks(self, x: torch.Tensor) -> list[list[np.ndarray]]:
        """The session's outputs per chunk of `batch` rows of `x` (padded rows still included)."""
        a = x.detach().float().cpu().contiguous().numpy()
        chunks = []
        for s in range(0, a.shape[0], self.batch):
            c = a[s:s + self.batch]
            if c.shape[0] < self.batch:
                c = np.concatenate([c, np.zeros((self.batch - c.shape[0], *c.shape[1:]), c.dtype)])
            chunks.append(self.session.run(None, {self.input_name: c}))
        return chunks

    def join(self, chunks: list[list[np.ndarray]], n: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The first `n` rows of each output, concatenated over `chunks`: a tensor, or a tuple for several outputs."""
        outs = tuple(torch.from_numpy(np.concatenate([c[i] for c in chunks])[:n]) for i in range(self.n_outputs))
        return outs[0] if self.n_outputs == 1 else outs

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """`(B, ...)` float32 -> output(s) `(B, ...)` float32 CPU."""
        return self.join(self.run_chunks(x), x.shape[0])


def _export(module: nn.Module, example: torch.Tensor, path: Path) -> int:
    """Export `module` on `example` to `path` atomically; the number of outputs."""
    with torch.no_grad():
        out = module(example)
    n = len(out) if isinstance(out, (tuple, list)) else 1
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter warns about its deprecation and traced shapes; the fixed-shape graph is checked
        # against the eager module on first use instead
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(tmp), input_names=["x"], output_names=[f"y{i}" for i in range(n)],
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return n


def discard(key: str, root: Path | None = None) -> None:
    """Remove the cached export of `key` (sidecar first: a file without it is never trusted)."""
    root = root or cache_root()
    (root / f"{key}.json").unlink(missing_ok=True)
    (root / f"{key}.onnx").unlink(missing_ok=True)


def load_cached(key: str, root: Path | None = None) -> OnnxEncoder | None:
    """The cached export of `key` as an OnnxEncoder, or None when it is missing, damaged or unreadable (then removed)."""
    root = root or cache_root()
    path, meta_path = root / f"{key}.onnx", root / f"{key}.json"
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = load_json(meta_path)
        if path.stat().st_size != meta["bytes"] or _file_sha256(path) != meta["sha256"]:
            raise ValueError("size or sha256 differs from its sidecar")
        return OnnxEncoder(path, int(meta["batch"]), int(meta["outputs"]))
    except Exception as e:  # anything wrong with a cached file means: export again, never trust it
        print(f"note: the cached ONNX encoder {path} is damaged ({type(e).__name__}: {str(e)[:120]}); exporting it "
              "again", file=sys.stderr)
        discard(key, root)
        return None


def export_encoder(module: nn.Module, example: torch.Tensor, key: str, root: Path | None = None) -> OnnxEncoder:
    """Export `module` (eval mode) traced on `example` `(batch, ...)` under `key`, then its sidecar; the session.

    One process per key exports; another one waits for it and then loads its file."""
    root = root or cache_root()
    path = root / f"{key}.onnx"
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{key}.lock"):
        done = load_cached(key, root)  # exported by another process while this one waited
        if done is not None:
            return done
        remove_stale_temporaries(root, path.name)  # what a killed export left: only the lock holder writes them
        n = _export(module, example, path)
        save_json({"bytes": path.stat().st_size, "sha256": _file_sha256(path), "batch": int(example.shape[0]),
                   "outputs": n, "input": list(example.shape[1:]), **_versions()}, root / f"{key}.json")
    return OnnxEncoder(path, int(example.shape[0]), n)


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file` (blocking; released when the process dies); no-op without fcntl."""
    if fcntl is None:
        yield
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
