"""samzeroshot's prediction: batched (and cached) slice embeddings, one SAM call per prompt, box propagation."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from samplan.methods.sam_common.decoding import channels_last, decode_prompts
from samplan.methods.sam_common.embedding_cache import EmbeddingCache, autocast_name, embedding_key, weights_identity
from samplan.methods.sam_common.plan import litemedsam_margin_px
from samplan.methods.sam_common.slice_input import box_scale, encoder_input, logits_to_slice, longest_side_shape
from samplan.methods.samzeroshot.network import slice_input
from samplan.methods.samzeroshot.plan import WEIGHTS_BUFFER, SAMZeroShotSection
from samplan.models.encoder_engine import prediction_encoder
from samplan.prompts.boxes import propagate, scale_box
from samplan.prompts.case_prompts import CasePrompts

ABSENT_LOGIT = -20.0  # label channels of slices no prompt reached


def cache_key(network: nn.Module, data: torch.Tensor, section: SAMZeroShotSection, device: torch.device) -> str:
    """The embedding-cache key of a case: image, backbone, weights identity, input size, intensity/channel mapping."""
    mapping = {"intensity": [r.to_dict() for r in section.intensity.per_channel],
               "channels": section.channels.rgb_from_channels, "precision": autocast_name(device)}
    return embedding_key(data, section.backbone, weights_identity(network, WEIGHTS_BUFFER), int(section.input_size),
                         mapping)


def embed_case(network: nn.Module, data: torch.Tensor, section: SAMZeroShotSection, device: torch.device,
               cache: EmbeddingCache | None = None, slices: list[int] | None = None) -> dict[int, torch.Tensor]:
    """Image embeddings `{z: (D, h, w)}` (CPU) of the slices `slices` (default: all) of `data` `(C, Z, Y, X)`.

    Slices go through the encoder in batches of `encoder_batch_size`. With `cache`, the embeddings of all slices of
    the case are read from, or computed once and written to, the cache.
    """
    z = data.shape[1]
    wanted = list(range(z)) if slices is None else sorted(set(slices))
    key = None
    if cache is not None:
        key = cache_key(network, data, section, device)
        hit = cache.get(key)
        if hit is not None and hit.shape[0] == z:
            return {i: hit[i] for i in wanted}
        wanted = list(range(z))  # a cached case holds every slice
    batch = max(1, int(section.encoder_batch_size))
    spec = slice_input(section)
    out: dict[int, torch.Tensor] = {}
    # eager, or ONNX Runtime when the Predictor chose that engine (samplan.models.encoder_engine)
    encoder = prediction_encoder(channels_last(network.image_encoder))
    with torch.no_grad():
        for s in range(0, len(wanted), batch):
            idx = wanted[s:s + batch]
            x, _ = encoder_input(data[:, idx].permute(1, 0, 2, 3), spec)
            emb = encoder(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
            out.update({i: emb[j] for j, i in enumerate(idx)})
    if cache is not None:
        cache.put(key, torch.stack([out[i] for i in range(z)]))
    return out


def decode(network: nn.Module, embedding: torch.Tensor, points: np.ndarray, point_labels: np.ndarray,
           box: np.ndarray | None, section: SAMZeroShotSection, shape: tuple[int, int],
           device: torch.device) -> torch.Tensor:
    """Mask logits `(H, W)` float32 CPU of one SAM call on one slice embedding `(D, h, w)`; prompts in slice pixels.

    "single": the single-mask output; "multimask": of the three masks, the one with the highest predicted IoU.
    """
    size = int(section.input_size)
    scale = box_scale(*shape, size)
    pts = scale_box(np.asarray(points, np.float64), scale) if len(points) else np.zeros((0, 2))
    bx = None if box is None else scale_box(box, scale)
    with torch.no_grad():
        lo = decode_prompts(network, embedding, pts, point_labels, bx, section.output == "multimask", device)
    return logits_to_slice(lo, size, longest_side_shape(*shape, size), shape)[0, 0].cpu()


def margin_input_px(section: SAMZeroShotSection) -> float:
    """Encoder-input pixels added around a propagated (or first-stage) box: the section's `propagation_margin_px`,
    else LiteMedSAM's rule at the section's input size."""
    margin = section.propagation_margin_px
    return litemedsam_margin_px(int(section.input_size)) if margin is None else float(margin)


def propagation_margin_px(section: SAMZeroShotSection, h: int, w: int) -> float:
    """`margin_input_px` as pixels of an `(h, w)` slice."""
    return margin_input_px(section) * max(h, w) / int(section.input_size)


def predict_case(network: nn.Module, data: torch.Tensor, section: SAMZeroShotSection, device: torch.device,
                 prompts: CasePrompts, *, embedding_cache: Any = None) -> torch.Tensor:
    """Logits `(K, Z, Y, X)` float32 CPU of a preprocessed case `(C, Z, Y, X)` for `prompts`.

    Channel 0 (background) is 0 and every label channel starts at ABSENT_LOGIT; each prompt's mask logits are merged
    into its label's channel by maximum (several calls on one slice = union of their masks), so argmax gives each
    pixel the label with the largest positive logit, else background (SAM's logit > 0 rule; "threshold" t shifts it:
    logits - t). With `prompts.propagate`, each prompt is a key-slice box propagated up and down, the next box from
    the previous prediction grown by `propagation_margin_px` (prompts.boxes.propagate).
    """
    network.eval()
    _, z, h, w = data.shape
    k = int(getattr(network, "samzeroshot_num_outputs", 1 + max([p.label for p in prompts.prompts], default=1)))
    out = torch.full((k, z, h, w), ABSENT_LOGIT)
    out[0] = 0
    if not prompts.prompts:
        return out
    threshold = float(section.threshold)
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
