"""Adapting pretrained SAM ViT weights to another input size or channel count (state-dict surgery only).

SAM's ViT stores an absolute position embedding `pos_embed` (1, g, g, E) for a g x g token grid
(g = input / 16) and, per attention block, relative-position tables `rel_pos_h`/`rel_pos_w`
(2*s-1, head_dim) where s is the attended extent: the token grid g for the global blocks, the
window size for the windowed ones. Building the encoder at a new input size and loading a state dict
passed through `resize_position_embeddings` keeps every pretrained weight usable.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samplan.errors import SamplanError

_POS_KEY = "pos_embed"
_REL_KEY = re.compile(r"(?:^|\.)blocks\.(\d+)\.attn\.rel_pos_[hw]$")
PATCH_EMBED_KEY = "patch_embed.proj.weight"


def _find_pos_embed(state: Mapping[str, torch.Tensor]) -> str | None:
    """The key of the absolute position embedding (with any module prefix), or None."""
    keys = [k for k in state if k == _POS_KEY or k.endswith("." + _POS_KEY)]
    if len(keys) > 1:
        raise SamplanError(f"several position embeddings in the state dict ({keys}); pass the encoder's own state dict")
    return keys[0] if keys else None


def resize_rel_pos(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Linearly interpolate a relative-position table (L, head_dim) to (rows, head_dim)."""
    if table.shape[0] == rows:
        return table.clone()
    t = table.detach().float().t().unsqueeze(0)  # (1, head_dim, L): interpolate along the distance axis
    out = F.interpolate(t, size=rows, mode="linear", align_corners=False)
    return out.squeeze(0).t().to(table.dtype).contiguous()


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinearly resize an absolute position embedding (1, g, g, E) to (1, grid, grid, E)."""
    if pos.shape[1] == grid and pos.shape[2] == grid:
        return pos.clone()
    t = pos.detach().float().permute(0, 3, 1, 2)  # (1, E, g, g)
    out = F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).to(pos.dtype).contiguous()


def resize_position_embeddings(
    state_or_encoder: Mapping[str, torch.Tensor] | nn.Module,
    new_input_size: int,
    *,
    patch_size: int = 16,
    global_attn_indexes: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Return a copy of a SAM ViT state dict whose position embeddings fit a `new_input_size` square input.

    The absolute embedding is resized bilinearly to the new token grid g' = new_input_size / patch_size;
    the relative-position tables of the global blocks are resized to 2*g'-1 rows; windowed blocks keep
    theirs. Keys may carry a prefix (e.g. "image_encoder."). `global_attn_indexes` names the global
    blocks; when omitted they are recognised as the tables with 2*g-1 rows for the stored grid g (give
    them explicitly when the window size equals the grid, where the two cannot be told apart).
    """
    state = dict(state_or_encoder.state_dict() if isinstance(state_or_encoder, nn.Module) else state_or_encoder)
    if new_input_size % patch_size:
        raise SamplanError(f"input size {new_input_size} is not a multiple of the patch size {patch_size}")
    new_grid = new_input_size // patch_size
    pos_key = _find_pos_embed(state)
    if pos_key is None:
        raise SamplanError("no 'pos_embed' in the state dict: this is not a SAM ViT image encoder checkpoint")
    old_grid = state[pos_key].shape[1]
    prefix = pos_key[: -len(_POS_KEY)]
    state[pos_key] = resize_pos_embed(state[pos_key], new_grid)
    global_set = set(global_attn_indexes) if global_attn_indexes is not None else None
    for key in list(state):
        m = _REL_KEY.search(key)
        if m is None or not key.startswith(prefix):
            continue
        rows = state[key].shape[0]
        is_global = int(m.group(1)) in global_set if global_set is not None else rows == 2 * old_grid - 1
        if is_global:
            state[key] = resize_rel_pos(state[key], 2 * new_grid - 1)
    return state


def adapt_patch_embed(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt an RGB patch-embedding weight (E, 3, k, k) to (E, in_chans, k, k).

    in_chans = 3: unchanged (a copy); 1: the mean of the RGB weights (a grey image x then gives one third
    of the response to (x, x, x)); otherwise the RGB weights are linearly interpolated along the channel
    axis, so the first/last channel equal R/B and the others blend their neighbours. No rescaling: the
    new channels keep the pretrained weight magnitudes and fine-tuning adapts the overall gain.
    """
    if weight.ndim != 4:
        raise SamplanError(f"patch-embedding weight must be (E, C, k, k), got shape {tuple(weight.shape)}")
    if in_chans < 1:
        raise SamplanError(f"in_chans must be >= 1, got {in_chans}")
    c = weight.shape[1]
    if in_chans == c:
        return weight.clone()
    if in_chans == 1:
        return weight.mean(dim=1, keepdim=True)
    e, _, kh, kw = weight.shape
    # (E*k*k, 1, C): interpolate along the channel axis only
    t = weight.detach().float().permute(0, 2, 3, 1).reshape(e * kh * kw, 1, c)
    out = F.interpolate(t, size=in_chans, mode="linear", align_corners=True)
    return out.reshape(e, kh, kw, in_chans).permute(0, 3, 1, 2).to(weight.dtype).contiguous()


def adapt_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    input_size: int,
    in_chans: int,
    patch_size: int = 16,
    global_attn_indexes: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Resize position embeddings to `input_size` and the patch embedding to `in_chans` in a SAM ViT state dict."""
    out = resize_position_embeddings(state, input_size, patch_size=patch_size, global_attn_indexes=global_attn_indexes)
    for key in list(out):
        if key == PATCH_EMBED_KEY or key.endswith("." + PATCH_EMBED_KEY):
            out[key] = adapt_patch_embed(out[key], in_chans)
    return out
