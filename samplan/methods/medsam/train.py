"""medsam's training: the recipe, MedSAM's loss, one box per sample, and the batched train/validation step.

Speed on a CPU: LiteMedSAM has only 9.8 M parameters but its TinyViT keeps the full 256x256 grid in its first stage
(1x1 patch embedding), about 75 GFLOP per image forward, so a step costs ~200+ GFLOP per sample; the B boxes of a
batch go through the prompt encoder and mask decoder in one call (sam_common.decoding.decode_boxes).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplan.devices import autocast
from samplan.errors import SamplanError
from samplan.methods.medsam.network import REGIONS_BUFFER, planned_region_box, slice_input
from samplan.methods.medsam.plan import MedSAMSection
from samplan.methods.sam_common.decoding import decode_boxes
from samplan.methods.sam_common.slice_input import box_scale, encoder_input, logits_at_input, masks_to_input
from samplan.prompts.boxes import box_from_mask, full_image_box, jitter_box, object_masks, scale_box
from samplan.engine.augmentation import slice_augmentation
from samplan.engine.data_parallel import training_loss
from samplan.engine.optim import make_optimizer, make_schedule
from samplan.engine.recipe import TrainingRecipe


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


LOSSES = {"dice_sigmoid_squared+bce": MedSAMLoss}  # the plan's recipe.loss.name


def medsam_recipe(section: MedSAMSection, cfg: Mapping[str, Any]) -> TrainingRecipe:
    """AdamW over the trainable parameters only, the planned schedule, Dice(squared)+BCE, the planned augmentation."""
    r = section.recipe
    aug = slice_augmentation(r.augmentation_params)
    oversample = r.oversample_foreground_percent
    policy = section.box_policy.name
    if policy not in oversample:
        raise SamplanError(f"medsam recipe.oversample_foreground_percent has no entry for box policy {policy!r}; "
                           "re-plan.")
    return TrainingRecipe(
        loss=LOSSES[r.loss.name](float(r.loss.weight_dice), float(r.loss.weight_bce)),
        make_optimizer=make_optimizer(r.optimizer), make_scheduler=make_schedule(r.lr_schedule),
        num_epochs=int(r.num_epochs), iterations_per_epoch=int(r.num_iterations_per_epoch),
        val_iterations_per_epoch=int(r.num_val_iterations_per_epoch), batch_size=int(section.batch_size),
        patch_size=tuple(int(p) for p in cfg["patch_size"]), oversample_foreground=float(oversample[policy]),
        augmentation=aug, mirror_axes=tuple(aug["mirror_axes"]), grad_clip=None)


def targets_and_boxes(target: torch.Tensor, section: MedSAMSection, model: nn.Module,
                      rng: np.random.Generator) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Per sample: a binary mask `(H, W)`, its foreground output index and its box (cache pixels, before jitter).

    The target is one foreground output present in the slice, chosen at random (one of its connected objects when
    the box policy says per "object"). A slice without any gets a random output, an empty target and the box the
    policy would give at inference without a reference (whole slice, or region).
    """
    t = target.detach().cpu().numpy()
    policy, regions = section.box_policy, section.regions
    n_fg = getattr(model, REGIONS_BUFFER).shape[0]
    b, _, h, w = t.shape
    masks, ks, boxes = np.zeros((b, h, w), bool), [], np.zeros((b, 4))
    for i in range(b):
        per_k = [t[i, k] > 0.5 if regions else t[i, 0] == k + 1 for k in range(n_fg)]
        present = [k for k in range(n_fg) if per_k[k].any()]
        k = int(rng.choice(present)) if present else int(rng.integers(n_fg))
        m = per_k[k]
        if policy.per == "object" and policy.name == "reference_jitter" and m.any():
            objs = object_masks(m)
            m = objs[int(rng.integers(len(objs)))]
        tight = box_from_mask(m)
        if policy.name == "reference_jitter" and tight is not None:
            box = tight
        elif policy.name == "fixed_full_image":
            box = full_image_box((h, w))
        else:  # the planned region (the whole slice while none is known)
            box = planned_region_box(model, k, (h, w), float(policy.region_pad_px))
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


def _input_boxes(boxes: np.ndarray, scale: float, section: MedSAMSection, content: tuple[int, int], train: bool,
                 rng: np.random.Generator) -> np.ndarray:
    """Slice-pixel boxes -> encoder-input boxes, jittered (MedSAM's 0..20 px, inside the resized image) in training."""
    out = np.stack([scale_box(bx, scale) for bx in boxes])
    policy = section.box_policy
    if train and policy.name == "reference_jitter" and float(policy.max_jitter_px) > 0:
        out = np.stack([jitter_box(bx, float(policy.max_jitter_px), content, rng, bool(policy.outward_only))
                        for bx in out])
    return out


def _counts(logits: torch.Tensor, tgt: torch.Tensor, ks: list[int], n_fg: int) -> dict[str, list[float]]:
    """Per foreground output, tp/fp/fn of the thresholded masks (logit > 0) against the binary targets."""
    tp, fp, fn = [0.0] * n_fg, [0.0] * n_fg, [0.0] * n_fg
    pred, ref = logits > 0, tgt > 0.5
    for i, k in enumerate(ks):
        tp[k] += float((pred[i] & ref[i]).sum())
        fp[k] += float((pred[i] & ~ref[i]).sum())
        fn[k] += float((~pred[i] & ref[i]).sum())
    return {"tp": tp, "fp": fp, "fn": fn}


def step(network: nn.Module, batch: dict[str, Any], recipe: TrainingRecipe, device: torch.device,
         section: MedSAMSection, *, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """A training step (optimizer given: jittered boxes, backward, AdamW step) or a validation step (with tp/fp/fn)."""
    train = optimizer is not None
    if train:
        freeze_frozen_norms(network)  # the trainer's network.train() must not move a frozen encoder's statistics
    target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))  # follows the trainer's per-epoch seed
    masks, ks, boxes = targets_and_boxes(target, section, network, rng)
    spec = slice_input(section)
    size = int(spec.input_size)
    images, valid = encoder_input(batch["data"], spec)
    scale = box_scale(*target.shape[-2:], size)
    boxes_t = torch.as_tensor(_input_boxes(boxes, scale, section, valid, train, rng), dtype=torch.float32,
                              device=device)
    tgt = masks_to_input(masks, size).to(device)
    if train:
        optimizer.zero_grad(set_to_none=True)
    def decode(net: nn.Module) -> torch.Tensor:
        return logits_at_input(decode_boxes(net, net.image_encoder(images.to(device)), boxes_t), size)

    if train:
        with autocast(device, recipe.autocast_dtype):
            loss = training_loss(network, lambda net: recipe.loss(decode(net), tgt))
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}
    with torch.no_grad(), autocast(device, recipe.autocast_dtype):
        logits = decode(network)
        loss = recipe.loss(logits, tgt)
    return {"loss": float(loss), **_counts(logits, tgt, ks, getattr(network, REGIONS_BUFFER).shape[0])}
