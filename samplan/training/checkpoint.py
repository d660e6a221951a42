"""Initialising a new training from another run's weights (--pretrained-weights); checkpoint files are in
samplan.models.checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from samplan.errors import SamplanError
from samplan.models.checkpoint import plain_key, unreadable_torch_file


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
        raise SamplanError(unreadable_torch_file(path, e, "give an intact checkpoint or state dict file",
                                                 "a checkpoint or state dict")) from e
    weights = saved.get("network_weights", saved) if isinstance(saved, dict) else None
    if not isinstance(weights, dict):
        raise SamplanError(f"{path} holds neither a samplan checkpoint nor a state dict.")
    weights = {plain_key(k): v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    own = network.state_dict()
    loaded = [k for k, v in own.items() if ".seg_layers." not in f".{k}" and k in weights and weights[k].shape == v.shape]
    if not loaded:
        raise SamplanError(f"no tensor in {path} matches the network by name and shape; were these weights trained "
                           "with the same method and configuration?")
    own.update({k: weights[k] for k in loaded})
    network.load_state_dict(own)
    return loaded, [k for k in own if k not in set(loaded)]
