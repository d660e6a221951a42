"""SAM's mask decoder called with a per-image shift of its mask tokens (ProMISe's IPS), as differentiable torch code.

segment-anything's `MaskDecoder.predict_masks` shares one set of output tokens across the batch, so a per-image
shift cannot be passed through its API. `decode_shifted` runs the decoder's own submodules (two-way transformer,
upscaling, hypernetwork MLPs, IoU head) in the same order with the shift added to the mask tokens; with a zero
shift it equals `MaskDecoder.predict_masks` (tests/test_promise.py checks it). Every prompt row has its own image
embedding (no repeat), so B images x K outputs are decoded in one call.
"""
from __future__ import annotations

import torch
from torch import nn


def decode_shifted(decoder: nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                   dense: torch.Tensor, token_shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """All mask logits `(N, M, 4h, 4w)` and IoU predictions `(N, M)` of N prompt rows.

    embeddings: `(N, D, h, w)` image embedding of each row; image_pe `(1, D, h, w)`; sparse `(N, T, D)` and dense
    `(N, D, h, w)` prompt embeddings (SAM's prompt encoder); token_shift `(N, M, D)` added to the M mask tokens
    (None: no shift). Mask 0 is SAM's single-mask output, masks 1..3 its multimask outputs.
    """
    n = sparse.shape[0]
    m = decoder.num_mask_tokens
    mask_tokens = decoder.mask_tokens.weight.unsqueeze(0).expand(n, -1, -1)
    if token_shift is not None:
        mask_tokens = mask_tokens + token_shift
    tokens = torch.cat([decoder.iou_token.weight.unsqueeze(0).expand(n, -1, -1), mask_tokens, sparse], dim=1)
    src = embeddings + dense
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(m)], dim=1)
    bu, cu, hu, wu = upscaled.shape
    masks = (hyper @ upscaled.reshape(bu, cu, hu * wu)).reshape(bu, m, hu, wu)
    return masks, decoder.iou_prediction_head(hs[:, 0])
