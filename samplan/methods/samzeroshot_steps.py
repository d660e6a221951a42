"""samzeroshot's tensor work: encoder input, batched (and cached) slice embeddings, point/box decoding, 3D prediction.

Imported lazily by `samplan.methods.samzeroshot`. The [0, 1] mapping, resizing and padding reuse medsam's
`encoder_input`; box propagation reuses `prompts.boxes.propagate`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplan.methods.medsam_steps import (ABSENT_LOGIT, channels_last, encoder_input, litemedsam_margin_px,
                                          resized_shape)
from samplan.prompts.boxes import propagate, scale_box


def unit_section(section: dict[str, Any]) -> dict[str, Any]:
    """The section with "window_minmax" channels expressed for medsam's `to_unit_range` (min-max after the clip)."""
    entries = [{"mode": "percentile_clip", "lower_percentile": 0.0, "upper_percentile": 100.0, "within_mask": False}
               if e["mode"] == "window_minmax" else e for e in section["intensity"]["per_channel"]]
    return {**section, "intensity": {**section["intensity"], "per_channel": entries}}


def network_input(network: nn.Module, slices: torch.Tensor, section: dict[str, Any]) -> torch.Tensor:
    """Slices `(B, C, H, W)` (cache values) -> encoder input `(B, 3, S, S)`: [0, 1], then the backbone's mean/std on
    0..255, resized (longest side S) and zero-padded after normalisation (SAM's order)."""
    x = slices.float()
    for c, e in enumerate(section["intensity"]["per_channel"]):
        if e["mode"] == "window_minmax":  # the paper's CT window, then min-max per slice
            lo, hi = e["window"]
            x[:, c] = x[:, c].clamp(lo, hi)
    x, _ = encoder_input(x, unit_section(section))
    (nh, nw), _ = resized_shape(*slices.shape[-2:], int(section["input_size"]))
    x = (x * 255.0 - network.pixel_mean.view(1, -1, 1, 1)) / network.pixel_std.view(1, -1, 1, 1)
    x[..., nh:, :] = 0
    x[..., :, nw:] = 0
    return x


def weights_id(network: nn.Module) -> str:
    """The network's weights identity (the `samzeroshot_weights_id` buffer), or a hash of its state when unset."""
    buf = getattr(network, "samzeroshot_weights_id", None)
    if buf is not None and bool(buf.any()):
        return bytes(buf.cpu().tolist()).hex()
    from samplan.inference.embedding_cache import array_sha256
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(network.state_dict().items()):
        h.update(k.encode())
        h.update(array_sha256(v.float()).encode())
    return h.hexdigest()


def _autocast_name(device: torch.device) -> str:
    """The autocast dtype in effect on `device` ("fp32" when off): embeddings in bf16 differ from fp32 ones."""
    try:
        if torch.is_autocast_enabled(device.type):
            return str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
    except (TypeError, RuntimeError):
        pass
    return "fp32"


def embed_case(network: nn.Module, data: torch.Tensor, section: dict[str, Any], device: torch.device,
               cache: Any = None, slices: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Image embeddings `{z: (D, h, w)}` (CPU) of the slices `slices` (default: all) of `data` `(C, Z, Y, X)`.

    Slices go through the encoder in batches of `encoder_batch_size`. With `cache` (an EmbeddingCache), the
    embeddings of all slices of the case are read from, or computed once and written to, the cache.
    """
    z = data.shape[1]
    wanted = list(range(z)) if slices is None else sorted(set(slices))
    key = None
    if cache is not None:
        from samplan.inference.embedding_cache import embedding_key

        key = embedding_key(data, section["backbone"], weights_id(network), int(section["input_size"]),
                            {"intensity": section["intensity"]["per_channel"], "channels": section["channels"],
                             "precision": _autocast_name(device)})
        hit = cache.get(key)
        if hit is not None and hit.shape[0] == z:
            return {i: hit[i] for i in wanted}
        wanted = list(range(z))  # a cached case holds every slice
    batch = max(1, int(section.get("encoder_batch_size", 2)))
    out: dict[int, torch.Tensor] = {}
    encoder = channels_last(network.image_encoder)
    with torch.no_grad():
        for s in range(0, len(wanted), batch):
            idx = wanted[s:s + batch]
            x = network_input(network, data[:, idx].permute(1, 0, 2, 3), section).to(device)
            emb = encoder(x.contiguous(memory_format=torch.channels_last)).float().cpu()
            out.update({i: emb[j] for j, i in enumerate(idx)})
    if cache is not None:
        cache.put(key, torch.stack([out[i] for i in range(z)]))
    return out


def decode(network: nn.Module, embedding: torch.Tensor, points: np.ndarray, point_labels: np.ndarray,
           box: np.ndarray | None, section: dict[str, Any], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Mask logits `(H, W)` float32 CPU of one SAM call on one slice embedding `(D, h, w)`.

    Prompts are in slice pixels (x, y); they are scaled to the encoder input (pixel centres). "single": the
    single-mask output; "multimask": of the three masks, the one with the highest predicted IoU.
    """
    h, w = shape
    size = int(section["input_size"])
    (nh, nw), scale = resized_shape(h, w, size)
    pts = None
    if len(points):
        coords = torch.as_tensor(scale_box(np.asarray(points, np.float64), scale), dtype=torch.float32, device=device)
        pts = (coords[None], torch.as_tensor(np.asarray(point_labels), dtype=torch.int64, device=device)[None])
    boxes = None if box is None else torch.as_tensor(scale_box(box, scale), dtype=torch.float32, device=device)[None]
    multi = section.get("output", "single") == "multimask"
    with torch.no_grad():
        sparse, dense = network.prompt_encoder(points=pts, boxes=boxes, masks=None)
        logits, iou = network.mask_decoder(image_embeddings=embedding[None].to(device), image_pe=network.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multi)
    best = int(torch.argmax(iou[0])) if multi else 0
    lo = logits[:, best:best + 1].float()
    lo = F.interpolate(lo, (size, size), mode="bilinear", align_corners=False)[..., :nh, :nw]
    return F.interpolate(lo, (h, w), mode="bilinear", align_corners=False)[0, 0].cpu()


def propagation_margin_px(section: dict[str, Any], h: int, w: int) -> float:
    """Slice pixels added around each propagated box: LiteMedSAM's rule (medsam_steps.litemedsam_margin_px) at any
    backbone's input size, unless the section's `propagation_margin_px` (input pixels) says otherwise."""
    size = int(section["input_size"])
    margin_input = section.get("propagation_margin_px")
    margin_input = litemedsam_margin_px(size) if margin_input is None else float(margin_input)
    return margin_input * max(h, w) / size


def predict_case(network: nn.Module, data: torch.Tensor, section: dict[str, Any], device: torch.device, prompts: Any,
                 *, embedding_cache: Any = None) -> torch.Tensor:
    """Logits `(K, Z, Y, X)` float32 CPU of a preprocessed case `(C, Z, Y, X)` for `prompts` (prompted.CasePrompts).

    Channel 0 (background) is 0 and every label channel starts at ABSENT_LOGIT; each prompt's mask logits are
    merged into its label's channel by maximum (several calls on one slice = union of their masks), so argmax
    gives each pixel the label with the largest positive logit, else background (SAM's logit > 0 rule;
    "threshold" t shifts it: logits - t). With `prompts.propagate`, each prompt is a key-slice box propagated up
    and down, the next box from the previous prediction grown by `propagation_margin_px` (prompts.boxes.propagate).
    """
    network.eval()
    _, z, h, w = data.shape
    k = int(getattr(network, "samzeroshot_num_outputs", 1 + max([p.label for p in prompts.prompts], default=1)))
    out = torch.full((k, z, h, w), ABSENT_LOGIT)
    out[0] = 0
    if not prompts.prompts:
        return out
    threshold = float(section.get("threshold", 0.0))
    needed = None if prompts.propagate or embedding_cache is not None else [p.slice for p in prompts.prompts]
    emb = embed_case(network, data, section, device, embedding_cache, needed)
    none = np.zeros((0, 2)), np.zeros((0,), np.int64)
    for p in prompts.prompts:
        if p.label >= k or p.label <= 0:
            continue
        if prompts.propagate:
            def predict_slice(i: int, box: np.ndarray, label: int = p.label) -> np.ndarray:
                lo = decode(network, emb[i], *none, box, section, (h, w), device) - threshold
                out[label, i] = torch.maximum(out[label, i], lo)
                return lo.numpy() > 0
            propagate(z, p.slice, p.box, predict_slice, margin=propagation_margin_px(section, h, w))
        else:
            lo = decode(network, emb[p.slice], p.points, p.point_labels, p.box, section, (h, w), device) - threshold
            out[p.label, p.slice] = torch.maximum(out[p.label, p.slice], lo)
    return out
