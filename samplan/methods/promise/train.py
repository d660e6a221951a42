"""promise's training: the recipe, BCE + Dice on the logits, oracle prompts, and the train/validation step.

A step: cache slices (whole slices without image augmentation, augmented patches with it) -> embeddings and APM
features (the feature cache, or a live no-gradient encoder pass) -> APM prompts (or oracle prompts) -> frozen prompt
encoder and mask decoder with the IPS shift -> the first multimask output at the input grid. Loss: BCE + soft Dice
of the mask logits (sigmoid applied once; the reference applied it twice) on the outputs present in the slice, plus
BCE of the presence logits on every output. Only the APM and IPS parameters reach Adam.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplan.devices import autocast
from samplan.engine.augmentation import slice_augmentation
from samplan.engine.data_parallel import training_loss
from samplan.engine.optim import make_optimizer, make_schedule
from samplan.engine.recipe import TrainingRecipe
from samplan.methods.promise.features import FeatureStore, feature_cache_dir
from samplan.methods.promise.network import PromiseNet
from samplan.methods.promise.plan import PromiseSection
from samplan.methods.sam_common.slice_input import logits_at_input, masks_to_input


def parameter_groups(net: PromiseNet, ips_lr_scale: float) -> list[dict[str, Any]]:
    """The APM at the optimiser's learning rate, the IPS at `ips_lr_scale` x it (frozen SAM: in no group)."""
    groups = [(net.apm, 1.0), (net.ips, float(ips_lr_scale))]
    return [{"params": list(m.parameters()), "lr_scale": scale} for m, scale in groups if m is not None]


def promise_recipe(section: PromiseSection, cfg: Mapping[str, Any]) -> TrainingRecipe:
    """Adam over the APM (planned lr) and IPS (planned share of it), the planned schedule, BCE + Dice; augmentation
    only when planned."""
    r = section.recipe
    ips_lr_scale = float(r.ips_lr_scale)
    aug = slice_augmentation(r.augmentation_params) if section.image_augmentation else {}
    return TrainingRecipe(
        loss=LOSSES[r.loss.name](r.loss.weight_bce, r.loss.weight_dice, r.loss.weight_presence, r.loss.weight_box,
                                 r.loss.weight_heatmap),
        make_optimizer=make_optimizer(r.optimizer), make_scheduler=make_schedule(r.lr_schedule),
        num_epochs=int(r.num_epochs), iterations_per_epoch=int(r.num_iterations_per_epoch),
        val_iterations_per_epoch=int(r.num_val_iterations_per_epoch), batch_size=int(section.batch_size),
        patch_size=tuple(int(p) for p in cfg["patch_size"]), oversample_foreground=float(r.foreground_slice_fraction),
        augmentation=aug, mirror_axes=tuple(aug.get("mirror_axes", ())), grad_clip=None,
        param_groups=lambda net: parameter_groups(net, ips_lr_scale))


class PromiseLoss(torch.nn.Module):
    """weight_bce * BCE + weight_dice * soft Dice of mask logits `(B, K, S, S)` on the present outputs, plus
    weight_presence * BCE of presence logits `(B, K)` (None: oracle prompts, no presence), plus weight_box * L1
    between a regressed box and the target's tight box (fractions of the input side) on the present outputs, plus
    weight_heatmap * (BCE on every output + soft Dice on the present ones) of the APM's heatmap against the target's
    share of each grid cell (readout "heatmap")."""

    def __init__(self, weight_bce: float, weight_dice: float, weight_presence: float, weight_box: float = 0.0,
                 weight_heatmap: float = 0.0, smooth: float = 1.0):
        super().__init__()
        self.wb, self.wd, self.wp, self.wbox = float(weight_bce), float(weight_dice), float(weight_presence), float(weight_box)
        self.wheat = float(weight_heatmap)
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, presence: torch.Tensor | None,
                prompts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Scalar loss; `target` `(B, K, S, S)` in {0, 1}; `prompts` the APM's (input pixels), for the box term."""
        logits, target = logits.float(), target.float()
        present = target.flatten(2).amax(-1) > 0
        loss = logits.new_zeros(())
        if bool(present.any()):
            lo, g = logits[present], target[present]  # (N, S, S)
            loss = loss + self.wb * F.binary_cross_entropy_with_logits(lo, g) + self.wd * self.soft_dice(lo, g)
            if self.wbox and prompts is not None and "box" in prompts:
                size = target.shape[-1]
                loss = loss + self.wbox * F.l1_loss(prompts["box"][present].float() / size,
                                                    tight_boxes(g) / size)
        if presence is not None:
            loss = loss + self.wp * F.binary_cross_entropy_with_logits(presence.float(), present.float())
        if self.wheat and prompts is not None and "heatmap" in prompts:
            loss = loss + self.wheat * self.heatmap_loss(prompts["heatmap"].float(), target, present)
        return loss

    def heatmap_loss(self, heat: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """BCE of heatmap logits `(B, K, h, w)` against the target's share of each cell, + soft Dice where present."""
        share = F.adaptive_avg_pool2d(target, heat.shape[-2:])
        loss = F.binary_cross_entropy_with_logits(heat, share)
        if bool(present.any()):
            loss = loss + self.soft_dice(heat[present], share[present])
        return loss

    def soft_dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1 - soft Dice of sigmoid(logits) `(N, h, w)` against `target`, averaged over the N maps."""
        p = torch.sigmoid(logits)
        dice = (2 * (p * target).sum((1, 2)) + self.smooth) / (p.sum((1, 2)) + target.sum((1, 2)) + self.smooth)
        return (1 - dice).mean()


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """`(N, 4)` boxes (x0, y0, x1, y1), pixel indices, of non-empty masks `(N, H, W)`."""
    rows, cols = masks.amax(-1) > 0, masks.amax(-2) > 0  # (N, H), (N, W)
    h, w = rows.shape[-1], cols.shape[-1]
    y0, y1 = rows.float().argmax(-1), h - 1 - rows.flip(-1).float().argmax(-1)
    x0, x1 = cols.float().argmax(-1), w - 1 - cols.flip(-1).float().argmax(-1)
    return torch.stack([x0, y0, x1, y1], -1).float()


LOSSES = {"bce+dice": PromiseLoss}  # the plan's recipe.loss.name


def label_masks(label_map: np.ndarray, section: PromiseSection) -> torch.Tensor:
    """A slice's label values `(H, W)` -> one mask per planned label group on the input grid `(K, S, S)`."""
    groups = np.stack([np.isin(label_map, g) for g in section.prompt.label_groups])
    return masks_to_input(groups, int(section.input_size))[:, 0]


def slices_and_masks(batch: dict[str, Any], section: PromiseSection, n_fg: int
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The batch's cache slices `[(C, H, W)]` and per-output target masks on the input grid `(B, K, S, S)`."""
    slices = list(batch["data"])
    if batch.get("whole_slices"):  # SliceLoader: label values of the raw label map
        return slices, torch.stack([label_masks(t[0].numpy(), section) for t in batch["target"]])
    # the trainer's patch loader: class indices (labels) or region masks
    target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
    t = target.detach().cpu().numpy()
    masks = [np.stack([t[i, k] > 0.5 if section.regions else t[i, 0] == k + 1 for k in range(n_fg)])
             for i in range(t.shape[0])]
    size = int(section.input_size)
    return slices, torch.stack([masks_to_input(m, size)[:, 0] for m in masks])


def oracle_prompts(masks: torch.Tensor, section: PromiseSection, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """ips_oracle's prompts from target masks on the input grid `(B, K, S, S)`: per output `num_positive` points
    inside and `num_negative` outside (uniform, with replacement), and/or the tight box, as the plan's prompt type
    says. An empty mask gets "not a point" labels (-1) and the whole-image box (its output is gated off anyway)."""
    b, k, s, _ = masks.shape
    p = section.prompt
    n = p.num_positive + p.num_negative
    points = torch.zeros(b, k, n, 2)
    labels = -torch.ones(b, k, n, dtype=torch.int64)
    boxes = torch.tensor([0.0, 0.0, s - 1.0, s - 1.0]).repeat(b, k, 1)
    m = masks.cpu().numpy() > 0.5
    for i in range(b):
        for j in range(k):
            inside = np.argwhere(m[i, j])
            if not len(inside):
                continue
            outside = np.argwhere(~m[i, j])
            pos = inside[rng.integers(len(inside), size=p.num_positive)]
            neg = outside[rng.integers(len(outside), size=p.num_negative)] if len(outside) else pos[:0]
            yx = np.concatenate([pos, neg])
            points[i, j, : len(yx)] = torch.from_numpy(yx[:, ::-1].astype(np.float32).copy())
            labels[i, j, : len(yx)] = torch.tensor([1] * len(pos) + [0] * len(neg))
            (y0, x0), (y1, x1) = inside.min(0), inside.max(0)
            boxes[i, j] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    if "points" in p.output:
        out.update(points=points, labels=labels)
    if "box" in p.output:
        out["box"] = boxes
    return out


@lru_cache(maxsize=8)
def _store(root: str | None) -> FeatureStore:
    return FeatureStore(root)


def feature_store(batch: dict[str, Any], cache_dir: Any) -> FeatureStore:
    """The disk feature cache for whole slices (same images every epoch); none for augmented patches."""
    return _store(str(feature_cache_dir(cache_dir)) if batch.get("whole_slices") else None)


def counts(logits: torch.Tensor, presence: torch.Tensor | None, target: torch.Tensor) -> dict[str, list[float]]:
    """Per foreground output, tp/fp/fn of the gated masks (logit > 0 where the output is judged present)."""
    pred = logits > 0
    if presence is not None:
        pred = pred & (presence > 0)[..., None, None]
    ref = target > 0.5
    dims = (0, 2, 3)
    return {"tp": (pred & ref).sum(dims).double().tolist(), "fp": (pred & ~ref).sum(dims).double().tolist(),
            "fn": (~pred & ref).sum(dims).double().tolist()}


def step(network: PromiseNet, batch: dict[str, Any], recipe: TrainingRecipe, device: torch.device,
         section: PromiseSection, cache_dir: Any, *, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """A training step (optimizer given: backward and Adam step) or a validation step (with tp/fp/fn)."""
    train = optimizer is not None
    slices, target = slices_and_masks(batch, section, network.n_fg)
    target = target.to(device)
    embedding, features = feature_store(batch, cache_dir).get(network, slices, section, device)
    oracle = None
    if section.mode == "ips_oracle":
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))  # follows the trainer's epoch seed
        oracle = {k: v.to(device) for k, v in oracle_prompts(target, section, rng).items()}
    if train:
        optimizer.zero_grad(set_to_none=True)
    def forward(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        masks, presence, prompts = net(embedding, features, oracle)
        logits = logits_at_input(masks, int(section.input_size))
        return recipe.loss(logits, target, presence, None if oracle is not None else prompts), logits, presence

    if train:
        with autocast(device, recipe.autocast_dtype):
            loss = training_loss(network, lambda net: forward(net)[0])
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}
    with torch.no_grad(), autocast(device, recipe.autocast_dtype):
        loss, logits, presence = forward(network)
    if presence is None:  # the oracle knows which outputs are present
        presence = torch.where(target.flatten(2).amax(-1) > 0, 1.0, -1.0)
    return {"loss": float(loss), **counts(logits.detach(), presence.detach(), target)}
