"""autosam2's prediction of a whole preprocessed volume: sliding-window U-Net, then the SAM branch on the planned
slices of the volume, fused.

1. Gaussian-weighted 3D sliding windows of the plan's patch (mirroring TTA as `unet`): the U-Net's logits of the
   whole volume, and its bridge features at the planned slices only (upsampled to the slice grid and blended with
   the same Gaussian weights), so memory grows with the planned slices, not with the volume's 32 feature channels.
2. The planned slices of the volume (samplan.methods.autosam2.slices over its whole depth), `SLICES_PER_CALL` at
   a time: prompts from the U-Net's probabilities, the SAM branch, fusion; slices without a prompted output keep
   the U-Net's probabilities.
Returns logits `(K, Z, Y, X)` whose softmax/sigmoid are the fused probabilities.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from samplan.engine.dense import flip_combinations
from samplan.engine.sliding_window import DEFAULT_STEP_SIZE, gaussian_importance_map, pad_to_patch, window_starts
from samplan.methods.autosam2.fusion import fuse, probabilities_to_logits
from samplan.methods.autosam2.network import AutoSAM2Net, feature_slices
from samplan.methods.autosam2.plan import AutoSAM2Section
from samplan.methods.autosam2.rows import foreground_probabilities, prompt_settings, renumber, slice_rows
from samplan.methods.autosam2.slices import select_slices

SLICES_PER_CALL = 4  # slices sent through SAM's encoder together (bounded memory, batched matmuls)


def _unet_with_mirroring(net: AutoSAM2Net, x: torch.Tensor, mirror_axes: Sequence[int]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and bridge features of a window batch, averaged over the mirrored copies (flipped back)."""
    logits, feats = net.unet(x)
    logits, feats = logits.float(), feats.float()
    combos = flip_combinations(mirror_axes, x.ndim - 2)
    for dims in combos:
        lo, fe = net.unet(torch.flip(x, dims))
        logits += torch.flip(lo.float(), dims)
        feats += torch.flip(fe.float(), dims)
    if combos:
        logits /= len(combos) + 1
        feats /= len(combos) + 1
    return logits, feats


@torch.no_grad()
def sliding_window(net: AutoSAM2Net, data: torch.Tensor, patch: Sequence[int], chosen: Sequence[int],
                   mirror_axes: Sequence[int], device: torch.device, step_size: float = DEFAULT_STEP_SIZE
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `(K, Z, Y, X)`, bridge features `(len(chosen), Cu, Y, X)` at slices `chosen`) of one case `(C, Z, Y, X)`."""
    patch = tuple(int(p) for p in patch)
    padded, keep = pad_to_patch(data, patch)
    gaussian = gaussian_importance_map(patch)
    where = {z + keep[0].start: i for i, z in enumerate(chosen)}  # padded slice index -> row of the feature buffer
    logits = weights = feats = None
    for start in window_starts(padded.shape[1:], patch, step_size):
        box = tuple(slice(s, s + p) for s, p in zip(start, patch))
        lo, fe = _unet_with_mirroring(net, padded[(slice(None), *box)][None].to(device), mirror_axes)
        lo = lo[0].cpu() * gaussian
        if logits is None:
            logits = torch.zeros((lo.shape[0], *padded.shape[1:]))
            weights = torch.zeros(padded.shape[1:])
            feats = torch.zeros((len(chosen), fe.shape[1], *padded.shape[2:]))
        logits[(slice(None), *box)] += lo
        weights[box] += gaussian
        local = [z - start[0] for z in range(start[0], start[0] + patch[0]) if z in where]
        if local:
            zl = torch.tensor(local, device=fe.device)
            fs = feature_slices(fe, torch.zeros_like(zl), zl, patch[0])
            fs = F.interpolate(fs, size=patch[1:], mode="bilinear", align_corners=False).cpu()
            rows = [where[start[0] + z] for z in local]
            feats[(rows, slice(None), box[1], box[2])] += fs * gaussian[local][:, None]
    logits /= weights
    inplane = weights[[z + keep[0].start for z in chosen]][:, None]
    feats /= inplane  # the Gaussian map is > 0 everywhere (samplan.engine.sliding_window)
    return logits[(slice(None), *keep)].contiguous(), feats[(slice(None), slice(None), keep[1], keep[2])].contiguous()


@torch.no_grad()
def predict_case(net: AutoSAM2Net, data: torch.Tensor, section: AutoSAM2Section, patch: Sequence[int], regions: bool,
                 device: torch.device, mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """Fused logits `(K, Z, Y, X)` (float32, CPU) of one preprocessed case `(C, Z, Y, X)`."""
    net = net.to(device).eval()
    data = torch.as_tensor(data, dtype=torch.float32)
    chosen = select_slices(data.shape[1], float(section.slice_fraction))
    weights = section.fusion.background_weight, section.fusion.tumour_weight
    settings = prompt_settings(section.prompt)
    logits, feats = sliding_window(net, data, patch, chosen, mirror_axes, device)
    if not chosen:
        return logits
    probs = torch.sigmoid(logits) if regions else torch.softmax(logits, 0)
    n_fg = probs.shape[0] if regions else probs.shape[0] - 1
    for c0 in range(0, len(chosen), SLICES_PER_CALL):
        idx = list(range(c0, min(c0 + SLICES_PER_CALL, len(chosen))))
        zs = [chosen[i] for i in idx]
        fg = foreground_probabilities(logits[:, zs], regions, dim=0).permute(1, 0, 2, 3)  # (n, F, Y, X)
        per_slice = slice_rows(fg.numpy(), settings)
        keep = [j for j, rows in enumerate(per_slice) if rows]
        if not keep:
            continue
        rows = renumber(per_slice, keep)
        slices = data[:, [zs[j] for j in keep]].permute(1, 0, 2, 3).to(device)
        sam_logits = net.refine(slices, feats[[idx[j] for j in keep]].to(device), rows).float().cpu()
        sam = torch.zeros((len(keep), n_fg, *probs.shape[-2:]))
        prompted = torch.zeros((len(keep), n_fg), dtype=torch.bool)
        for r, lg in zip(rows, torch.sigmoid(sam_logits)):
            sam[r.image, r.output], prompted[r.image, r.output] = lg[0], True
        z_keep = [zs[j] for j in keep]
        unet = probs[:, z_keep].permute(1, 0, 2, 3)
        fused = fuse(unet, sam, prompted, regions, *weights)
        probs[:, z_keep] = fused.permute(1, 0, 2, 3)
    return probabilities_to_logits(probs, regions)
