"""medsam's tensor work: cache values -> encoder input, batched box decoding, loss, steps, planned regions, 3D prediction.

Imported lazily by `samplan.methods.medsam` (torch is needed here only when training or predicting).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplan.devices import autocast
from samplan.errors import SamplanError
from samplan.prompts.boxes import (box_area, box_from_mask, full_image_box, jitter_box, object_masks, pad_box,
                                   propagate, scale_box, union_box)

if TYPE_CHECKING:
    from samplan.training.recipe import TrainingRecipe

ABSENT_LOGIT = -20.0  # slices that a label's box propagation never reached
EMPTY_REGION = (1.0, 1.0, 0.0, 0.0)  # x0 > x1: no target seen yet
_QUANTILE_MAX = 1_000_000  # torch.quantile refuses inputs above 2**24 values; a strided subsample is plenty


# ------------------------------------------------------------------------------------------------ inputs

def to_unit_range(x: torch.Tensor, entries: list[dict[str, Any]]) -> torch.Tensor:
    """Cache values `(B, C, H, W)` -> float32 in [0, 1] per channel and image, following the plan's intensity entries."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    b = x.shape[0]
    for c, e in enumerate(entries):
        v = x[:, c].float()
        if e["mode"] == "window":
            lo, hi = e["window"]
            out[:, c] = ((v - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        elif e["mode"] == "scale":
            out[:, c] = (v * float(e["factor"]) / 255.0).clamp(0, 1)
        else:  # per-image percentile clip, all images of the batch at once (NaN marks pixels outside the mask)
            flat = v.reshape(b, -1)
            mask = flat != 0 if e.get("within_mask") else torch.ones_like(flat, dtype=torch.bool)
            mask = mask | ~mask.any(1, keepdim=True)  # an all-zero image uses all its pixels
            vals = torch.where(mask, flat, torch.full_like(flat, float("nan")))
            vals = vals[:, :: max(1, vals.shape[1] // _QUANTILE_MAX)]
            qs = torch.tensor([e["lower_percentile"], e["upper_percentile"]], device=x.device) / 100.0
            q = torch.nanquantile(vals, qs, dim=1)  # (2, B)
            lo, hi = q[0].view(b, 1), q[1].view(b, 1)
            img = ((flat - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
            out[:, c] = torch.where(mask, img, torch.zeros_like(img)).view_as(v)  # background stays 0
    return out


def resized_shape(h: int, w: int, size: int) -> tuple[tuple[int, int], float]:
    """The (height, width) of a slice resized so that its longer side is `size`, and the scale factor."""
    scale = size / max(h, w)
    return (max(1, round(h * scale)), max(1, round(w * scale))), scale


def encoder_input(data: torch.Tensor, section: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Slices `(B, C, H, W)` (cache values) -> `(B, 3, S, S)` float32 in [0, 1] (longest side S, zero pad) and the scale."""
    size = int(section["input_size"])
    x = to_unit_range(data, section["intensity"]["per_channel"])[:, section["channels"]["rgb_from_channels"]]
    (nh, nw), scale = resized_shape(*x.shape[-2:], size)
    if (nh, nw) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    return F.pad(x, (0, size - nw, 0, size - nh)), scale


def encoder_input_masks(masks: np.ndarray, size: int) -> torch.Tensor:
    """Binary masks `(B, H, W)` -> `(B, 1, S, S)` float32 on the encoder input grid (nearest, zero pad)."""
    m = torch.from_numpy(masks.astype(np.float32))[:, None]
    (nh, nw), _ = resized_shape(*masks.shape[-2:], size)
    if (nh, nw) != tuple(masks.shape[-2:]):
        m = F.interpolate(m, size=(nh, nw), mode="nearest")
    return F.pad(m, (0, size - nw, 0, size - nh))


def channels_last(encoder: nn.Module) -> nn.Module:
    """The encoder with its 4D weights in channels-last layout (in place; same values), for inference: TinyViT's
    convolutions run faster so (LiteMedSAM, 2 CPU cores: 1.2 s per 256^2 slice instead of 1.5-1.9 s)."""
    return encoder.to(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------ decoding

def decode_boxes(model: nn.Module, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Single-mask logits `(B, 1, h, w)` (SAM's low resolution) for B image embeddings with one box `(B, 4)` each.

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


def masks_at_input(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Low-resolution mask logits `(B, 1, h, w)` -> `(B, 1, size, size)` float32 (bilinear)."""
    logits = logits.float()
    if logits.shape[-1] == size:
        return logits
    return F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)


class MedSAMLoss(nn.Module):
    """MedSAM's loss: soft Dice of sigmoid probabilities (squared denominators) + BCE; logits/targets `(B, 1, H, W)`."""

    def __init__(self, weight_dice: float = 1.0, weight_bce: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.weight_dice, self.weight_bce, self.smooth = weight_dice, weight_bce, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss: per-image Dice averaged over the batch, plus the mean BCE."""
        logits, g = logits.float(), target.float()
        p = torch.sigmoid(logits)
        dims = tuple(range(1, p.ndim))
        dice = 1 - (2 * (p * g).sum(dims) + self.smooth) / ((p * p).sum(dims) + (g * g).sum(dims) + self.smooth)
        bce = F.binary_cross_entropy_with_logits(logits, g)
        return self.weight_dice * dice.mean() + self.weight_bce * bce


# ------------------------------------------------------------------------------------------------ boxes per sample

def label_mask(seg: np.ndarray, k: int, section: dict[str, Any]) -> np.ndarray:
    """Boolean mask of foreground output k in a label map (label k+1, or region k's labels)."""
    if section.get("regions"):
        return np.isin(seg, section["regions_values"][k])
    return seg == k + 1


def planned_region_box(model: nn.Module, k: int, shape: tuple[int, int], pad: float) -> np.ndarray:
    """The planned region of foreground output k on a slice `(H, W)`, padded by `pad` px; the whole slice if unknown."""
    r = model.medsam_regions[k].detach().cpu().double().numpy()
    if r[0] > r[2]:
        return full_image_box(shape)
    return pad_box(r * [shape[1] - 1, shape[0] - 1, shape[1] - 1, shape[0] - 1], pad, shape)


def targets_and_boxes(target: torch.Tensor, section: dict[str, Any], model: nn.Module,
                      rng: np.random.Generator) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Per sample: a binary mask `(H, W)`, its foreground output index and its box (cache pixels, before jitter).

    The target is one foreground output present in the slice, chosen at random (one of its connected
    objects when the box policy says per "object"). A slice without any gets a random output, an empty
    target and the box the policy would give at inference without a reference (whole slice, or region).
    """
    t = target.detach().cpu().numpy()
    policy, regions = section["box_policy"], bool(section.get("regions"))
    n_fg = model.medsam_regions.shape[0]
    b, _, h, w = t.shape
    masks, ks, boxes = np.zeros((b, h, w), bool), [], np.zeros((b, 4))
    for i in range(b):
        per_k = [t[i, k] > 0.5 if regions else t[i, 0] == k + 1 for k in range(n_fg)]
        present = [k for k in range(n_fg) if per_k[k].any()]
        k = int(rng.choice(present)) if present else int(rng.integers(n_fg))
        m = per_k[k]
        if policy.get("per") == "object" and policy["name"] == "reference_jitter" and m.any():
            objs = object_masks(m)
            m = objs[int(rng.integers(len(objs)))]
        tight = box_from_mask(m)
        if policy["name"] == "reference_jitter" and tight is not None:
            box = tight
        elif policy["name"] == "fixed_full_image":
            box = full_image_box((h, w))
        else:  # the planned region (the whole slice while none is known)
            box = planned_region_box(model, k, (h, w), float(policy["region_pad_px"]))
        masks[i], boxes[i] = m, box
        ks.append(k)
    return masks, ks, boxes


def freeze_frozen_norms(network: nn.Module) -> None:
    """Batch-norm layers whose parameters are all frozen keep their running statistics (eval mode)."""
    for mod in network.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            params = list(mod.parameters())
            if params and not any(p.requires_grad for p in params):
                mod.eval()


def step(network: nn.Module, batch: dict[str, Any], recipe: "TrainingRecipe", device: torch.device,
         section: dict[str, Any], *, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """A training step (optimizer given: jittered boxes, backward, AdamW step) or a validation step (with tp/fp/fn)."""
    train = optimizer is not None
    if train:
        freeze_frozen_norms(network)  # the trainer's network.train() must not move a frozen encoder's statistics
    target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))  # follows the trainer's per-epoch seed
    masks, ks, boxes = targets_and_boxes(target, section, network, rng)
    images, scale = encoder_input(batch["data"], section)
    size = images.shape[-1]
    content, _ = resized_shape(*target.shape[-2:], size)
    policy = section["box_policy"]
    boxes_in = np.stack([scale_box(bx, scale) for bx in boxes])
    if train and policy["name"] == "reference_jitter" and float(policy["max_jitter_px"]) > 0:
        # jitter in encoder-input pixels (MedSAM's 0..20 px), kept inside the resized image
        outward = bool(policy.get("outward_only", True))
        boxes_in = np.stack([jitter_box(bx, float(policy["max_jitter_px"]), content, rng, outward) for bx in boxes_in])
    tgt = encoder_input_masks(masks, size).to(device)
    images = images.to(device)
    boxes_t = torch.as_tensor(boxes_in, dtype=torch.float32, device=device)
    if train:
        optimizer.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train), autocast(device, recipe.autocast_dtype):
        logits = masks_at_input(decode_boxes(network, network.image_encoder(images), boxes_t), size)
        loss = recipe.loss(logits, tgt)
    if train:
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}
    n_fg = network.medsam_regions.shape[0]
    tp, fp, fn = [0.0] * n_fg, [0.0] * n_fg, [0.0] * n_fg
    pred, ref = logits > 0, tgt > 0.5
    for i, k in enumerate(ks):
        tp[k] += float((pred[i] & ref[i]).sum())
        fp[k] += float((pred[i] & ~ref[i]).sum())
        fn[k] += float((~pred[i] & ref[i]).sum())
    return {"loss": float(loss), "tp": tp, "fp": fp, "fn": fn}


# ------------------------------------------------------------------------------------------------ planned regions

def regions_from_cache(cache_dir: Path, section: dict[str, Any], n_fg: int) -> tuple[torch.Tensor, int]:
    """Per foreground output, the union box of its voxels over the cached cases, as fractions `(x0, y0, x1, y1)`
    of the slice (EMPTY_REGION where never seen); and the number of cases read (one at a time)."""
    from samplan.preprocessing.cache import open_case

    regions = [None] * n_fg
    cases = sorted(p.name[: -len("_seg.b2nd")] for p in Path(cache_dir).glob("*_seg.b2nd"))
    for case in cases:
        _, seg, _ = open_case(cache_dir, case)
        if seg is None:
            continue
        s = np.asarray(seg[:])[0]  # (Z, H, W)
        h, w = s.shape[-2:]
        for k in range(n_fg):
            m = label_mask(s, k, section)
            box = box_from_mask(m.any(0))  # union over slices of the per-slice boxes
            if box is not None:
                regions[k] = union_box(regions[k], box / ([max(w - 1, 1), max(h - 1, 1)] * 2))
    return torch.tensor([list(r) if r is not None else list(EMPTY_REGION) for r in regions], dtype=torch.float32), len(cases)


# ------------------------------------------------------------------------------------------------ 3D prediction

NEEDS_BOXES = ("this medsam model was trained with reference boxes (box policy reference_jitter), so it needs a box "
               "per structure at prediction: samplan_predict --prompts FILE (boxes), or --prompt-strategy box|propagate "
               "with --reference-dir DIR; or train it with box_policy fixed_full_image / fixed_planned_region to predict "
               "without boxes.")


@dataclass(frozen=True)
class OutputBoxes:
    """The boxes of one foreground output: `each` = predict exactly these slices with their boxes; else propagate
    from every key slice (largest box first) up and down, never overwriting a slice that has its own box."""

    boxes: dict[int, np.ndarray]
    each: bool


def boxes_from_prompts(prompts: Any, n_fg: int, section: dict[str, Any]) -> dict[int, OutputBoxes]:
    """Per foreground output, the boxes of a case's prompts (`samplan.inference.prompted.CasePrompts`).

    Strategy "box" (a reference box on every slice) predicts exactly those slices; "propagate" and a prompts
    file propagate from their boxes. medsam is box-prompted: a prompt without a box is an error, as is a
    label value that is not one of the model's outputs.
    """
    if section.get("regions"):
        firsts = [int(r[0]) for r in section["regions_values"]]
        to_output = {v: k for k, v in enumerate(firsts)}
        what = f"the first label value of a region ({', '.join(map(str, firsts))})"
    else:
        to_output = {v: v - 1 for v in range(1, n_fg + 1)}
        what = f"a foreground label value 1..{n_fg}"
    out: dict[int, dict[int, np.ndarray]] = {}
    for p in prompts.prompts:
        if p.box is None:
            raise SamplanError(f"case {prompts.case}: medsam takes box prompts, but the prompt on slice {p.slice} (label "
                               f"{p.label}) has only points; add a box, or use --prompt-strategy box or propagate.")
        if p.label not in to_output:
            raise SamplanError(f"case {prompts.case}: prompt label {p.label} on slice {p.slice} is not a medsam output; "
                               f"use {what}.")
        out.setdefault(to_output[p.label], {})[int(p.slice)] = np.asarray(p.box, np.float64)
    return {k: OutputBoxes(b, each=prompts.strategy == "box") for k, b in out.items()}


def propagation_margin(section: dict[str, Any]) -> float:
    """Pixels (encoder input) added around each propagated box: the plan's `propagation_margin_px`, else half the
    training jitter (the mean outward shift the model saw), else LiteMedSAM's 3 px at 256 scaled to the input."""
    policy = section["box_policy"]
    if policy.get("propagation_margin_px") is not None:
        return float(policy["propagation_margin_px"])
    if policy["name"] == "reference_jitter":
        from samplan.methods.medsam import MAX_JITTER_PX

        return float(policy.get("max_jitter_px", MAX_JITTER_PX)) / 2
    return litemedsam_margin_px(int(section["input_size"]))


def litemedsam_margin_px(input_size: int) -> float:
    """LiteMedSAM's 3D inference grows the previous slice's box by 3 px at its 256 input: that fraction of `input_size`."""
    return 3.0 * input_size / 256


def propagate_from_keys(n_slices: int, keys: dict[int, np.ndarray], shape: tuple[int, int],
                        predict_slice: Callable[[int, np.ndarray], np.ndarray], margin: float = 0.0) -> None:
    """Box propagation from several key slices: each key is predicted with its own box (largest first) and
    propagated (boxes grown by `margin` px) until a prediction is empty or the walk reaches a slice already
    predicted or keyed."""
    done: set[int] = set()
    empty = np.zeros(shape, bool)
    for key in sorted(keys, key=lambda z: -box_area(keys[z])):
        def guarded(i: int, box: np.ndarray, key: int = key) -> np.ndarray:
            if i != key and (i in done or i in keys):
                return empty  # stops this direction: that slice has its own prediction
            done.add(i)
            return predict_slice(i, box)
        propagate(n_slices, key, keys[key], guarded, margin=margin)


def predict_case(network: nn.Module, data: torch.Tensor, section: dict[str, Any], device: torch.device, *,
                 prompts: Any = None, reference: np.ndarray | None = None, chunk: int = 2) -> torch.Tensor:
    """Logits `(K, Z, Y, X)` float32 CPU for a preprocessed case `data` `(C, Z, Y, X)`.

    Boxes per foreground output k come from `prompts` (CasePrompts on the preprocessed grid; see
    boxes_from_prompts) or a `reference` label map `(Z, Y, X)` on the same grid (its largest-box slice, as
    `reference_prompts(..., "propagate")` gives it).
    With boxes, the given slices are predicted with them and, except for per-slice boxes, the box is
    propagated up and down (next box = box of the previous prediction) until a prediction is empty; slices
    not reached get ABSENT_LOGIT. Without boxes, a fixed policy predicts every slice with its fixed box
    (whole slice, or k's planned region), streamed in chunks; a reference_jitter model refuses (NEEDS_BOXES):
    trained on tight boxes, it has no answer for a box it was never shown.
    Labels: channel 0 (background) is 0, so argmax = the label with the largest positive mask logit, else
    background (SAM's logit > 0 rule); regions: the mask logit per region.
    """
    network.eval()
    c, z, h, w = data.shape
    n_fg = network.medsam_regions.shape[0]
    policy = section["box_policy"]
    size = int(section["input_size"])
    (nh, nw), scale = resized_shape(h, w, size)
    fg = torch.full((n_fg, z, h, w), ABSENT_LOGIT)
    if prompts is not None:
        per_output = boxes_from_prompts(prompts, n_fg, section)
    elif reference is not None:  # the largest box of each output, propagated: the "propagate" reference prompts
        from samplan.inference.prompted import reference_prompts

        groups = section["regions_values"] if section.get("regions") else [[k + 1] for k in range(n_fg)]
        per_output = boxes_from_prompts(reference_prompts("reference", reference, "propagate", {"label_groups": groups}),
                                        n_fg, section)
    elif policy["name"] == "reference_jitter":
        raise SamplanError(NEEDS_BOXES)
    else:
        per_output = None

    encoder = channels_last(network.image_encoder)

    def embed(sl: slice) -> torch.Tensor:
        images, _ = encoder_input(data[:, sl].permute(1, 0, 2, 3), section)
        return encoder(images.to(device).contiguous(memory_format=torch.channels_last))

    def logits_for(emb: torch.Tensor, boxes: list[np.ndarray]) -> torch.Tensor:
        bx = torch.as_tensor(np.stack([scale_box(b, scale) for b in boxes]), dtype=torch.float32, device=device)
        lo = masks_at_input(decode_boxes(network, emb, bx), size)[:, :, :nh, :nw]
        return F.interpolate(lo, (h, w), mode="bilinear", align_corners=False)[:, 0].float().cpu()

    def fixed_box(k: int) -> np.ndarray:
        if policy["name"] == "fixed_full_image":
            return full_image_box((h, w))
        return planned_region_box(network, k, (h, w), float(policy["region_pad_px"]))

    with torch.no_grad():
        if per_output is None:
            for s in range(0, z, chunk):
                emb = embed(slice(s, s + chunk))
                for k in range(n_fg):
                    fg[k, s:s + emb.shape[0]] = logits_for(emb, [fixed_box(k)] * emb.shape[0])
        elif per_output:
            # embeddings computed once per slice on demand: per-slice boxes need only their slices
            cache: dict[int, torch.Tensor] = {}

            def embedding(i: int) -> torch.Tensor:
                if i not in cache:
                    start = i - i % chunk
                    emb = embed(slice(start, start + chunk))
                    cache.update({start + j: emb[j:j + 1] for j in range(emb.shape[0])})
                return cache[i]

            for k, ob in per_output.items():
                def predict_slice(i: int, box: np.ndarray, k: int = k) -> np.ndarray:
                    fg[k, i] = logits_for(embedding(i), [box])[0]
                    return fg[k, i].numpy() > 0
                if ob.each:
                    for i, box in ob.boxes.items():
                        predict_slice(i, box)
                else:
                    propagate_from_keys(z, ob.boxes, (h, w), predict_slice, margin=propagation_margin(section) / scale)
    if section.get("regions"):
        return fg
    return torch.cat([torch.zeros((1, z, h, w)), fg])
