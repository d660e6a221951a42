"""Prompted decoding with segment-anything's prompt encoder and mask decoder: many boxes at once, or points and a box.

Prompts are in encoder-input pixels `(x, y)` (scale slice pixels with samplan.prompts.boxes.scale_box); logits are
SAM's low resolution `(B, 1, h, w)` (samplan.methods.sam_common.slice_input.logits_to_slice brings them back).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def decode_boxes(model: nn.Module, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Single-mask logits `(B, 1, h, w)` for B image embeddings `(B, D, h, w)` with one box `(B, 4)` each.

    segment-anything's MaskDecoder adds the dense prompt embeddings to the image embeddings after repeating
    those once per prompt, so B images with B boxes in one call would not match up. Passing a single zero
    image embedding and "image + dense prompt" as the dense input gives every box exactly its own image
    (0 + a == a) in one batched decoder call, through the public API only.
    """
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes.float(), masks=None)
    zero = embeddings.new_zeros((1, *embeddings.shape[1:]))
    logits, _ = model.mask_decoder(image_embeddings=zero, image_pe=model.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=embeddings + dense,
                                   multimask_output=False)
    return logits


def decode_prompts(model: nn.Module, embedding: torch.Tensor, points: np.ndarray, point_labels: np.ndarray,
                   box: np.ndarray | None, multimask: bool, device: torch.device) -> torch.Tensor:
    """Mask logits `(1, 1, h, w)` of one SAM call on one image embedding `(D, h, w)` with points `(N, 2)` (labels
    1/0) and/or a box `(4,)`, in input pixels. `multimask`: of SAM's three masks, the one with the best predicted IoU;
    else the single-mask output."""
    pts = None
    if len(points):
        coords = torch.as_tensor(np.asarray(points, np.float64), dtype=torch.float32, device=device)
        pts = (coords[None], torch.as_tensor(np.asarray(point_labels), dtype=torch.int64, device=device)[None])
    boxes = None if box is None else torch.as_tensor(np.asarray(box, np.float64), dtype=torch.float32, device=device)[None]
    sparse, dense = model.prompt_encoder(points=pts, boxes=boxes, masks=None)
    logits, iou = model.mask_decoder(image_embeddings=embedding[None].to(device),
                                     image_pe=model.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=multimask)
    best = int(torch.argmax(iou[0])) if multimask else 0
    return logits[:, best:best + 1]


def channels_last(encoder: nn.Module) -> nn.Module:
    """The encoder with its 4D weights in channels-last layout (in place; same values), for inference: TinyViT's
    convolutions run faster so (LiteMedSAM, 2 CPU cores: 1.2 s per 256^2 slice instead of 1.5-1.9 s)."""
    return encoder.to(memory_format=torch.channels_last)
