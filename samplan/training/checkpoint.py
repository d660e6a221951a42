"""Checkpoints: plain dicts of tensors, numbers and strings, written atomically, read with weights_only=True."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from samplan.errors import SamplanError
from samplan.utils import atomic_path

# keys every samplan checkpoint has (others may be added by methods, as plain data)
REQUIRED_KEYS = ("network_weights", "method", "configuration", "fold", "plans_name", "current_epoch")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically (a killed run never leaves a truncated checkpoint)."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise SamplanError(f"checkpoint {path} does not exist; train this fold first or pick another --checkpoint.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise SamplanError(f"{path} cannot be loaded as a samplan checkpoint ({type(e).__name__}: {e}).") from e
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise SamplanError(f"{path} is not a samplan checkpoint (missing {missing}).")
    return state


def _strip_prefixes(key: str) -> str:
    """Drop the wrappers' prefixes (DistributedDataParallel 'module.', torch.compile '_orig_mod.')."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_pretrained_weights(network: torch.nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Copy into `network` every tensor of a checkpoint (or plain state dict file) whose name and shape match.

    The segmentation heads (`seg_layers`) are never copied, so weights trained for other labels transfer.
    Returns (loaded keys, network keys left as initialised); SamplanError when nothing matches.
    """
    path = Path(path)
    if not path.is_file():
        raise SamplanError(f"pretrained weights {path} do not exist.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise SamplanError(f"{path} cannot be loaded with weights_only=True ({type(e).__name__}: {e}).") from e
    weights = saved.get("network_weights", saved) if isinstance(saved, dict) else None
    if not isinstance(weights, dict):
        raise SamplanError(f"{path} holds neither a samplan checkpoint nor a state dict.")
    weights = {_strip_prefixes(k): v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    own = network.state_dict()
    loaded = [k for k, v in own.items() if ".seg_layers." not in f".{k}" and k in weights and weights[k].shape == v.shape]
    if not loaded:
        raise SamplanError(f"no tensor in {path} matches the network by name and shape; were these weights trained "
                           "with the same method and configuration?")
    own.update({k: weights[k] for k in loaded})
    network.load_state_dict(own)
    return loaded, [k for k in own if k not in set(loaded)]
