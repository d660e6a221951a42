"""The generic training and validation steps (nnU-Net's): one optimiser step, and loss + hard tp/fp/fn of a batch.

Batches come from `PatchLoader.epoch`: {"data": float32 (B, C, *patch), "target": (B, 1, *patch) class
indices or (B, R, *patch) region masks, or a list of those (full resolution first) with deep supervision}.
Precision follows recipe.autocast_dtype (set by the trainer from --precision; see samplan.devices);
gradients are scaled only for float16.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from samplan.dataset.labels import LabelManager
from samplan.devices import autocast
from samplan.engine.data_parallel import training_loss
from samplan.engine.recipe import TrainingRecipe


def to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor or a list of tensors to `device`."""
    if isinstance(x, (list, tuple)):
        return [t.to(device, non_blocking=True) for t in x]
    return x.to(device, non_blocking=True)


def default_train_step(network: nn.Module, batch: dict[str, Any], recipe: TrainingRecipe,
                       optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, float]:
    """Forward, loss, backward, gradient-norm clipping (recipe.grad_clip), optimiser step; returns {"loss"}."""
    data = batch["data"].to(device, non_blocking=True)
    target = to_device(batch["target"], device)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, recipe.autocast_dtype):
        loss = training_loss(network, lambda net: recipe.loss(net(data), target))
    scaler = recipe.grad_scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if recipe.grad_clip:
            nn.utils.clip_grad_norm_(network.parameters(), recipe.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if recipe.grad_clip:
            nn.utils.clip_grad_norm_(network.parameters(), recipe.grad_clip)
        optimizer.step()
    return {"loss": float(loss.detach())}


def hard_tp_fp_fn(output: torch.Tensor, target: torch.Tensor, label_manager: LabelManager) -> tuple[list[float], list[float], list[float]]:
    """Batch-summed tp/fp/fn of the thresholded prediction per foreground class (softmax) or per region (sigmoid).

    `output`: full-resolution logits `(B, K, ...)`; `target`: `(B, 1, ...)` class indices (ignore label raw)
    or `(B, R[+1], ...)` region masks (an extra last channel marks ignored voxels).
    """
    output = output.float()
    mask = None
    if label_manager.has_regions:
        if target.shape[1] == output.shape[1] + 1:
            mask = (target[:, -1:] == 0).float()
            target = target[:, :-1]
        pred = (torch.sigmoid(output) > 0.5).float()
        ref = target.float()
    else:
        target = target.long()
        if label_manager.ignore_label is not None:
            mask = (target != label_manager.ignore_label).float()
            target = torch.where(mask.bool(), target, torch.zeros_like(target))
        k = output.shape[1]
        pred = torch.zeros_like(output).scatter_(1, output.argmax(1, keepdim=True), 1.0)
        ref = torch.zeros_like(output).scatter_(1, target.clamp(0, k - 1), 1.0)
    if mask is not None:
        pred, ref = pred * mask, ref * mask
    axes = [0, *range(2, output.ndim)]
    tp = (pred * ref).sum(axes)
    fp = (pred * (1 - ref)).sum(axes)
    fn = ((1 - pred) * ref).sum(axes)
    if not label_manager.has_regions:  # background Dice is not of interest
        tp, fp, fn = tp[1:], fp[1:], fn[1:]
    return tp.tolist(), fp.tolist(), fn.tolist()


def default_validation_step(network: nn.Module, batch: dict[str, Any], recipe: TrainingRecipe,
                            device: torch.device, label_manager: LabelManager) -> dict[str, Any]:
    """Loss (with deep supervision, as in training) and hard tp/fp/fn lists per class of the full-resolution output."""
    data = batch["data"].to(device, non_blocking=True)
    target = to_device(batch["target"], device)
    with torch.no_grad(), autocast(device, recipe.autocast_dtype):
        output = network(data)
        loss = recipe.loss(output, target)
    if isinstance(output, (list, tuple)):
        output, target = output[0], target[0]
    tp, fp, fn = hard_tp_fp_fn(output, target, label_manager)
    return {"loss": float(loss), "tp": tp, "fp": fp, "fn": fn}
