"""Pretrained weights into a prompted SAM model (segment_anything Sam): the planned checkpoint, hash-checked, and the
identity of the weights it was given (what the embedding cache is keyed on)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from samplan.errors import SamplanError
from samplan.methods.sam_common.embedding_cache import state_sha256
from samplan.models.specs import BackboneSpec
from samplan.models import weights as model_weights


def is_random(checkpoint: str, spec: BackboneSpec) -> bool:
    """True when `checkpoint` asks for random weights: "none", or "auto" for a backbone without official weights."""
    return checkpoint.lower() == "none" or (checkpoint == "auto" and spec.weights is None)


def record_weights_identity(network: nn.Module, buffer: str, identity: str) -> None:
    """Store a weights sha256 (hex) in the network's uint8 buffer `buffer`, where the embedding caches read it."""
    getattr(network, buffer).copy_(torch.tensor(list(bytes.fromhex(identity)), dtype=torch.uint8))


def load_sam_weights(model: nn.Module, spec: BackboneSpec, checkpoint: str, input_size: int,
                     own_buffers: tuple[str, ...], method: str, identify: bool = False) -> tuple[str, str | None]:
    """Load `checkpoint` ("auto" = the backbone's official weights, a file, or "none" = keep the random ones) into a
    Sam model built for `spec` at `input_size`; returns (what was loaded, for the log; with `identify` the sha256 of
    the weights file, or of the random state, else None).

    The method's own buffers (`own_buffers`) are not in a SAM checkpoint; any other missing or unexpected key is a
    SamplanError naming the file.
    """
    if is_random(checkpoint, spec):
        why = " (no official weights for this backbone)" if checkpoint == "auto" else ""
        return f"random weights{why}", state_sha256(model, exclude=own_buffers) if identify else None
    state = model_weights.load_backbone_state(spec, checkpoint, input_size=input_size, in_chans=3, part="model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(own_buffers):
        raise SamplanError(f"{method} checkpoint {checkpoint} does not fit {spec.name}: missing {list(missing)[:3]}, "
                           f"unexpected {list(unexpected)[:3]}.")
    if not identify:
        return f"weights from {checkpoint}", None
    path = model_weights.resolve_weights(spec.weights, None) if checkpoint == "auto" else Path(checkpoint).expanduser()
    return f"weights from {path}", model_weights.sha256_file(path)
