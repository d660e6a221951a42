"""samplan checkpoints: plain dicts of tensors, numbers and strings, written atomically, read with weights_only=True.

Below both training (which writes them) and inference (which reads them), so neither imports the other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from samplan.errors import SamplanError
from samplan.utils import atomic_path

# keys every samplan checkpoint has (others may be added by methods, as plain data)
REQUIRED_KEYS = ("network_weights", "method", "configuration", "fold", "plans_name", "current_epoch")
# what DistributedDataParallel and torch.compile put in front of parameter names
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def plain_key(key: str) -> str:
    """A parameter name without the wrappers' prefixes ('module.', '_orig_mod.')."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def plain_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict whose names carry none of the wrappers' prefixes."""
    return {plain_key(k): v for k, v in weights.items()}
