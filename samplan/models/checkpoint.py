"""samplan checkpoints: plain dicts of tensors, numbers and strings, written atomically, read with weights_only=True.

Below both training (which writes them) and inference (which reads them), so neither imports the other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from samplan.errors import InputError, SamplanError
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
    """Read a checkpoint without unpickling arbitrary objects (weights_only=True); InputError naming the file and the
    fix when it is damaged or not a samplan checkpoint (SamplanError when it does not exist)."""
    path = Path(path)
    if not path.is_file():  # not trained yet (exit status 1), unlike a damaged file (InputError, 2)
        raise SamplanError(f"checkpoint {path} does not exist; train this fold first or pick another --checkpoint.")
    fix = "copy it again from where it was trained, or re-train the fold (samplan_train)"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise InputError(unreadable_torch_file(path, e, fix, "a samplan checkpoint")) from e
    missing = [k for k in REQUIRED_KEYS if k not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
    if missing:
        raise InputError(f"{path} is not a samplan checkpoint (it lacks {', '.join(missing)}); {fix}.")
    return state


def unreadable_torch_file(path: str | Path, e: Exception, fix: str, what: str = "a checkpoint") -> str:
    """One line on why torch.load(weights_only=True) refused `path`: it holds code-carrying objects, or it is damaged."""
    if "global" in str(e).lower():  # torch: "Unsupported global: ..." or "unsupported GLOBAL posix.system ..."
        return (f"{path} holds Python objects other than tensors, numbers and strings, so samplan does not load it "
                f"(weights_only=True: it could run code); it is not {what}: {fix}.")
    return f"{path} is damaged or truncated ({torch_error_reason(e)}); {fix}."


def torch_error_reason(e: Exception) -> str:
    """The gist of a torch.load error in one short line (torch's messages run over many lines of advice on
    weights_only=False, which samplan never uses)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # the weights-only unpickler puts the actual reason after this marker line
    marker = next((i for i, line in enumerate(lines) if line.endswith("WeightsUnpickler error:")), None)
    gist = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else (lines[0] if lines else "no details")
    return f"{type(e).__name__}: {gist.split('. ')[0].rstrip('.')[:200]}"


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
