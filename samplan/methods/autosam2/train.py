"""autosam2's training recipe and its train/validation step: the U-Net's loss plus SAM's on the prompted slices.

A step: the U-Net on the batch's 3D patches; the planned slices of each patch (samplan.methods.autosam2.slices,
over the patch's depth) get prompts from the U-Net's current (detached) probabilities; of the slices with at
least one prompted output, at most `max_sam_slices_per_step` (a CPU budget; random, seeded by the trainer's epoch
seed) go through the SAM branch. Loss = weight_dice x Dice + weight_bce x CE/BCE of the U-Net's logits + weight_sam
x (the same on SAM's mask logits against each row's reference mask). The pseudo Dice of validation is that of the
fused probabilities, i.e. of what prediction outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from samplan.dataset.labels import LabelManager
from samplan.devices import autocast
from samplan.engine.augmentation import augmentation_params
from samplan.engine.data_parallel import training_loss
from samplan.engine.losses import DiceBCELoss, build_segmentation_loss
from samplan.engine.optim import make_optimizer, make_schedule
from samplan.engine.recipe import TrainingRecipe
from samplan.engine.steps import hard_tp_fp_fn
from samplan.methods.autosam2.fusion import fuse, probabilities_to_logits
from samplan.methods.autosam2.network import AutoSAM2Net, PromptRow, feature_slices
from samplan.methods.autosam2.plan import AutoSAM2Section
from samplan.methods.autosam2.rows import foreground_probabilities, prompt_settings, renumber, slice_rows
from samplan.methods.autosam2.slices import select_slices


def parameter_groups(net: AutoSAM2Net, sam_lr_scale: float) -> list[dict[str, Any]]:
    """The new modules (U-Net, mapper, bridge) at the optimiser's learning rate, SAM's parts at `sam_lr_scale` x it."""
    sam = {id(p) for p in net.sam.parameters()}
    return [{"params": [p for p in net.parameters() if id(p) not in sam], "lr_scale": 1.0},
            {"params": list(net.sam.parameters()), "lr_scale": float(sam_lr_scale)}]


def autosam2_recipe(section: AutoSAM2Section, cfg: Mapping[str, Any], label_manager: LabelManager) -> TrainingRecipe:
    """Dice + CE/BCE (0.7/0.3) without deep supervision, AdamW with a one-cycle schedule (SAM's trainable parts at a
    lower rate), gradient clipping 1.0, nnU-Net's 3D augmentation; patch and batch of the base 3D configuration."""
    r = section.recipe
    sam_lr_scale = float(r.sam_lr_scale)
    loss = build_segmentation_loss(label_manager.has_regions, batch_dice=False, ignore_label=label_manager.ignore_label,
                                   weight_ce=float(r.loss.weight_bce), weight_dice=float(r.loss.weight_dice))
    aug = augmentation_params(cfg["patch_size"], cfg["spacing"])
    aug["use_mask_for_norm"] = list(cfg["use_mask_for_norm"])
    return TrainingRecipe(
        loss=loss, make_optimizer=make_optimizer(r.optimizer), make_scheduler=make_schedule(r.lr_schedule),
        num_epochs=int(r.num_epochs), iterations_per_epoch=int(r.num_iterations_per_epoch),
        val_iterations_per_epoch=int(r.num_val_iterations_per_epoch), batch_size=int(cfg["batch_size"]),
        patch_size=tuple(int(p) for p in cfg["patch_size"]), oversample_foreground=float(r.oversample_foreground_percent),
        deep_supervision_scales=None, augmentation=aug, mirror_axes=tuple(aug["mirror_axes"]), grad_clip=r.grad_clip,
        param_groups=lambda net: parameter_groups(net, sam_lr_scale))


@dataclass
class BranchBatch:
    """The slices of a batch that went through SAM: batch items, slice indices, rows and SAM's mask logits."""

    batch_index: torch.Tensor
    z: torch.Tensor
    rows: list[PromptRow]
    logits: torch.Tensor


def run_branch(net: AutoSAM2Net, data: torch.Tensor, logits: torch.Tensor, features: torch.Tensor,
               section: AutoSAM2Section, regions: bool) -> BranchBatch | None:
    """The SAM branch on the planned, prompted slices of a batch of patches (at most the planned number per step)."""
    depth = data.shape[2]
    trains_unet = bool(section.branch.bridge_trains_unet)
    chosen = select_slices(depth, float(section.slice_fraction))
    if not chosen:
        return None
    with torch.no_grad():
        probs = foreground_probabilities(logits.detach()[:, :, chosen], regions, dim=1)  # (B, F, n, Y, X)
    per_slice = slice_rows(probs.permute(0, 2, 1, 3, 4).flatten(0, 1).cpu().numpy(), prompt_settings(section.prompt))
    candidates = [i for i, rows in enumerate(per_slice) if rows]
    cap = section.max_sam_slices_per_step
    if cap is not None and len(candidates) > cap:
        pick = torch.randperm(len(candidates))[: int(cap)].sort().values.tolist()
        candidates = [candidates[i] for i in pick]
    if not candidates:
        return None
    n = len(chosen)
    b = torch.tensor([i // n for i in candidates], device=data.device)
    z = torch.tensor([chosen[i % n] for i in candidates], device=data.device)
    rows = renumber(per_slice, candidates)
    slices = data[b, :, z]
    if not trains_unet:  # the bridge reads the U-Net's features without training them
        features = features.detach()
    return BranchBatch(b, z, rows, net.refine(slices, feature_slices(features, b, z, depth), rows))


def row_targets(target: torch.Tensor, branch: BranchBatch, regions: bool) -> torch.Tensor:
    """Each row's reference mask `(R, 1, H, W)`: its region, or its label (foreground output k = label k + 1)."""
    masks = []
    for r in branch.rows:
        b, z = int(branch.batch_index[r.image]), int(branch.z[r.image])
        if regions:
            masks.append(target[b, r.output, z].float())
        else:
            masks.append((target[b, 0, z] == r.output + 1).float())
    return torch.stack(masks)[:, None]


def fused_batch_probabilities(logits: torch.Tensor, branch: BranchBatch | None, section: AutoSAM2Section,
                              regions: bool) -> torch.Tensor:
    """Probabilities `(B, K, Z, Y, X)` of the U-Net, fused with SAM's on the processed slices."""
    weights = section.fusion.background_weight, section.fusion.tumour_weight
    probs = torch.sigmoid(logits.float()) if regions else torch.softmax(logits.float(), 1)
    if branch is None:
        return probs
    n_fg = probs.shape[1] if regions else probs.shape[1] - 1
    n = len(branch.z)
    sam = torch.zeros((n, n_fg, *probs.shape[-2:]), dtype=probs.dtype, device=probs.device)
    prompted = torch.zeros((n, n_fg), dtype=torch.bool, device=probs.device)
    for r, lg in zip(branch.rows, torch.sigmoid(branch.logits.float())):
        sam[r.image, r.output], prompted[r.image, r.output] = lg[0], True
    unet = probs[branch.batch_index, :, branch.z]
    fused = fuse(unet, sam, prompted, regions, *weights)
    probs = probs.clone()
    probs[branch.batch_index, :, branch.z] = fused
    return probs


def step(net: AutoSAM2Net, batch: dict[str, Any], recipe: TrainingRecipe, device: torch.device,
         section: AutoSAM2Section, *, label_manager: LabelManager | None = None,
         optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """One training step (with `optimizer`) or one validation step (with `label_manager`: loss and tp/fp/fn of the
    fused output)."""
    data = batch["data"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    regions, w = bool(section.regions), section.recipe.loss
    sam_loss = DiceBCELoss(batch_dice=False, do_bg=True, weight_ce=float(w.weight_bce), weight_dice=float(w.weight_dice))
    weight_sam = float(w.weight_sam)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    outputs: dict[str, Any] = {}

    def forward(model: AutoSAM2Net) -> torch.Tensor:
        logits, features = model.unet(data)
        branch = run_branch(model, data, logits, features, section, regions)
        outputs.update(logits=logits, branch=branch)
        loss = recipe.loss(logits, target)
        return loss if branch is None else loss + weight_sam * sam_loss(branch.logits, row_targets(target, branch, regions))

    with torch.set_grad_enabled(optimizer is not None), autocast(device, recipe.autocast_dtype):
        loss = training_loss(net, forward)
    logits, branch = outputs["logits"], outputs["branch"]
    if optimizer is None:
        fused = probabilities_to_logits(fused_batch_probabilities(logits, branch, section, regions), regions)
        tp, fp, fn = hard_tp_fp_fn(fused, target, label_manager)
        return {"loss": float(loss), "tp": tp, "fp": fp, "fn": fn, "sam_slices": 0 if branch is None else len(branch.z)}
    _backward_and_step(net, loss, recipe, optimizer)
    return {"loss": float(loss.detach()), "sam_slices": 0 if branch is None else len(branch.z)}


def _backward_and_step(net: AutoSAM2Net, loss: torch.Tensor, recipe: TrainingRecipe,
                       optimizer: torch.optim.Optimizer) -> None:
    """Backward, gradient-norm clipping, optimiser step (loss scaling for float16). The U-Net and the SAM branch are
    clipped separately: the branch's larger gradients would otherwise shrink every U-Net step."""
    scaler = recipe.grad_scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if recipe.grad_clip:
        unet = {id(p) for p in net.unet.parameters()}
        trainable = [p for p in net.parameters() if p.requires_grad]
        for part in ([p for p in trainable if id(p) in unet], [p for p in trainable if id(p) not in unet]):
            if part:
                nn.utils.clip_grad_norm_(part, recipe.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
