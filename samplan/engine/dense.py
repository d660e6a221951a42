"""Dense prediction of one preprocessed case: Gaussian-weighted sliding windows (3D) or batched slices (2D).

The network sees exactly what it saw in training: 3D patches of the plan's patch size, or 2D slices
taken along axis 0 of the transposed volume (the planned slice axis). Windows overlap by half a patch;
their logits are blended with a Gaussian importance map. Mirroring test-time augmentation averages
the logits of every combination of flipped axes (2**n - 1 flips plus the original).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from samplan.devices import resolve_device
from samplan.engine.sliding_window import DEFAULT_STEP_SIZE, gaussian_importance_map, pad_to_patch, window_starts
from samplan.preprocessing.preprocessor import configuration_plan

# upper bound of input voxels (channels x window voxels x batch) sent to the network at once
_MAX_BATCH_VOXELS = 2**23


def network_output(output: Any) -> torch.Tensor:
    """Full-resolution logits of a network output: deep-supervision networks return a list (highest resolution first)."""
    return output[0] if isinstance(output, (list, tuple)) else output


def flip_combinations(mirror_axes: Sequence[int], n_spatial: int) -> list[tuple[int, ...]]:
    """Every non-empty set of flipped tensor dims for `(B, C, *spatial)` input, from spatial `mirror_axes`."""
    axes = sorted({int(a) for a in mirror_axes})
    if axes and (axes[0] < 0 or axes[-1] >= n_spatial):
        raise ValueError(f"mirror axes {tuple(mirror_axes)} do not fit a network input with {n_spatial} spatial axes")
    dims = [a + 2 for a in axes]
    return [c for k in range(1, len(dims) + 1) for c in itertools.combinations(dims, k)]


def predict_with_mirroring(network: nn.Module, x: torch.Tensor, mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """Logits `(B, K, *spatial)` of `x` `(B, C, *spatial)`, averaged over the mirrored copies of `x`."""
    out = network_output(network(x)).float()
    combos = flip_combinations(mirror_axes, x.ndim - 2)
    for dims in combos:
        out += torch.flip(network_output(network(torch.flip(x, dims))).float(), dims)
    if combos:
        out /= len(combos) + 1
    return out


# no_grad rather than inference_mode: callers may update the returned logits in place (fold averaging)
@torch.no_grad()
def predict_dense(
    network: nn.Module,
    data: torch.Tensor | np.ndarray,
    plans: dict[str, Any],
    configuration: str,
    *,
    mirror_axes: Sequence[int] = (),
    device: str | torch.device = "cpu",
    step_size: float = DEFAULT_STEP_SIZE,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Logits `(K, Z, Y, X)` float32 on the CPU for one preprocessed case `(C, Z, Y, X)` (transposed order).

    A 3-entry patch size means 3D windows; a 2-entry one means slices along axis 0, `batch_size` of them
    (default: the plan's batch size, capped so that a batch stays under ~32 MB of input) per forward pass.
    Images smaller than the patch are zero-padded (centred) and the padding is cut off again. `mirror_axes`
    are spatial axes of the network input (3D: 0..2 = Z, Y, X; 2D: 0..1 = Y, X); empty disables TTA.
    For networks that return a list (deep supervision), only the first, full-resolution output is used.
    """
    plan = configuration_plan(plans, configuration)
    patch = tuple(int(p) for p in plan["patch_size"])
    device = resolve_device(device)
    data = torch.as_tensor(data, dtype=torch.float32)
    if data.ndim != 4:
        raise ValueError(f"predict_dense expects one case (C, Z, Y, X), got shape {tuple(data.shape)}")
    slices_2d = len(patch) == 2
    window = (1, *patch) if slices_2d else patch
    padded, keep = pad_to_patch(data, window)
    starts = window_starts(padded.shape[1:], window, step_size, slice_axis_every_voxel=slices_2d)
    gaussian = gaussian_importance_map(patch).reshape(window)
    if batch_size is None:
        batch_size = int(plan.get("batch_size", 1))
    batch_size = max(1, min(batch_size, _MAX_BATCH_VOXELS // max(1, data.shape[0] * int(np.prod(window)))))

    network = network.to(device).eval()
    # float32 accumulators on the CPU: nnU-Net's float16 ones need its value_scaling_factor to avoid underflow
    logits = weights = None
    gaussian_dev = gaussian.to(device)
    # precision (autocast) is the caller's choice, e.g. Predictor(precision=...)
    for b0 in range(0, len(starts), batch_size):
        batch_starts = starts[b0 : b0 + batch_size]
        boxes = [tuple(slice(s, s + w) for s, w in zip(st, window)) for st in batch_starts]
        x = torch.stack([padded[(slice(None), *box)] for box in boxes]).to(device)
        if slices_2d:
            x = x[:, :, 0]  # (B, C, 1, y, x) -> (B, C, y, x)
        out = predict_with_mirroring(network, x, mirror_axes)
        if slices_2d:
            out = out[:, :, None]
        out = (out * gaussian_dev).cpu()
        if logits is None:
            logits = torch.zeros((out.shape[1], *padded.shape[1:]), dtype=torch.float32)
            weights = torch.zeros(padded.shape[1:], dtype=torch.float32)
        for box, o in zip(boxes, out):
            logits[(slice(None), *box)] += o
            weights[box] += gaussian
    logits /= weights
    return logits[(slice(None), *keep)].contiguous()
