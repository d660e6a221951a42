"""On-disk cache of image embeddings per case and backbone, so that re-prompting a case skips the image encoder.

Like segment-anything's SamPredictor (set_image once, predict many times), but across runs: the key is the
sha256 of the preprocessed case array (shape, dtype, bytes) together with the backbone name, the weights
identity (sha256 of the weights file, or of the random state), the input size and the intensity/channel
mapping, so that a changed image or backbone never reuses stale embeddings. Files are `{key}.pt` holding
one plain tensor `(Z, D, h, w)` float32, or a dict of named tensors (an embedding with intermediate encoder features,
as promise caches them), saved with torch.save and read with weights_only=True (no pickle), written atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from samplan.utils import atomic_path


def array_sha256(data: np.ndarray | torch.Tensor) -> str:
    """sha256 of an array's shape, dtype and bytes (C order)."""
    a = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.shape}|{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def weights_identity(network: nn.Module, buffer: str) -> str:
    """The identity of a network's weights: the sha256 stored in its uint8 buffer `buffer` (that of the weights file
    it was loaded from, see samplan.methods.sam_common.weights), or, while that is unset, a hash of its state."""
    buf = getattr(network, buffer, None)
    if buf is not None and bool(buf.any()):
        return bytes(buf.cpu().tolist()).hex()
    return state_sha256(network, exclude=(buffer,))


def state_sha256(network: nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over the names and values of a network's state dict (random weights have no file to hash)."""
    h = hashlib.sha256()
    for k, v in sorted(network.state_dict().items()):
        if k not in exclude:
            h.update(k.encode())
            h.update(array_sha256(v.float()).encode())
    return h.hexdigest()


def autocast_name(device: torch.device) -> str:
    """The autocast dtype in effect on `device` ("fp32" when off): embeddings in bf16 differ from fp32 ones."""
    try:
        if torch.is_autocast_enabled(device.type):
            return str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
    except (TypeError, RuntimeError):
        pass
    return "fp32"


def embedding_key(data: np.ndarray | torch.Tensor, backbone: str, weights_id: str, input_size: int,
                  mapping: Mapping[str, Any] | None = None) -> str:
    """The cache key of one case's embeddings (hex sha256); `mapping`: how values became encoder input (JSON data)."""
    h = hashlib.sha256(array_sha256(data).encode())
    h.update(json.dumps({"backbone": backbone, "weights": weights_id, "input_size": int(input_size),
                         "mapping": mapping or {}}, sort_keys=True).encode())
    return h.hexdigest()


class EmbeddingCache:
    """A folder of `{key}.pt` embedding tensors; `hits` / `misses` count look-ups of this instance."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        """Where the embeddings of `key` live."""
        return self.root / f"{key}.pt"

    def get(self, key: str) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """The cached tensor (or dict of tensors) of `key`, or None (a missing or unreadable file counts as a miss)."""
        p = self.path(key)
        if p.is_file():
            try:
                t = torch.load(p, map_location="cpu", weights_only=True)
            except Exception:  # a damaged file is recomputed, never trusted
                t = None
            if isinstance(t, torch.Tensor) or (isinstance(t, dict) and t
                                               and all(isinstance(v, torch.Tensor) for v in t.values())):
                self.hits += 1
                return t
        self.misses += 1
        return None

    def put(self, key: str, embeddings: torch.Tensor | dict[str, torch.Tensor]) -> Path:
        """Store `embeddings` (a tensor or a dict of named tensors; detached, CPU, contiguous) atomically under `key`."""
        p = self.path(key)
        if isinstance(embeddings, dict):
            value: Any = {k: v.detach().cpu().contiguous() for k, v in embeddings.items()}
        else:
            value = embeddings.detach().cpu().contiguous()
        with atomic_path(p) as tmp:
            torch.save(value, tmp)
        return p
