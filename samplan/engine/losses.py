"""Segmentation losses with nnU-Net v2.8.1's definitions: soft Dice + cross-entropy, soft Dice + BCE, deep supervision.

Shapes: logits `(B, K, *spatial)` float; softmax targets `(B, 1, *spatial)` integer class indices (the
ignore label, if any, keeps its raw value); region targets `(B, R, *spatial)` float/bool masks, optionally
with one extra last channel that marks ignored voxels (1 = ignore). With deep supervision both are lists,
full resolution first.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from samplan.engine.data_parallel import sum_over_ranks


def _one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`(B, 1, ...)` class indices -> `(B, K, ...)` float32 one-hot (indices must be in [0, K))."""
    out = torch.zeros((target.shape[0], num_classes, *target.shape[2:]), device=target.device, dtype=torch.float32)
    return out.scatter_(1, target.long(), 1.0)


class SoftDiceLoss(nn.Module):
    """Negative mean soft Dice: -(2 I + s) / (|P| + |G| + s), per sample and class (or per class over the batch).

    `x` are probabilities after `apply_nonlin` (softmax over classes or sigmoid), `y` class indices
    `(B, 1, ...)` or a one-hot / region tensor shaped like `x`. `do_bg=False` drops channel 0 (softmax
    background). `batch_dice` sums intersections and volumes over the batch before dividing, as nnU-Net
    does for 2D. `loss_mask` `(B, 1, ...)` (1 = keep) removes voxels from every sum.
    """

    def __init__(self, apply_nonlin: str = "softmax", batch_dice: bool = False, do_bg: bool = True, smooth: float = 1e-5):
        super().__init__()
        if apply_nonlin not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"apply_nonlin must be softmax, sigmoid or none, got {apply_nonlin!r}")
        self.apply_nonlin, self.batch_dice, self.do_bg, self.smooth = apply_nonlin, batch_dice, do_bg, smooth

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss in [-1, 0] for logits `x` `(B, K, ...)` and target `y` (see the class docstring)."""
        if self.apply_nonlin == "softmax":
            x = torch.softmax(x, 1)
        elif self.apply_nonlin == "sigmoid":
            x = torch.sigmoid(x)
        axes = tuple(range(2, x.ndim))
        with torch.no_grad():  # the target never needs gradients
            y_onehot = y.to(torch.float32) if y.shape == x.shape else _one_hot(y, x.shape[1])
            if not self.do_bg:
                y_onehot = y_onehot[:, 1:]
            if loss_mask is not None:
                y_onehot = y_onehot * loss_mask
            sum_gt = y_onehot.sum(axes, dtype=torch.float32)
        if not self.do_bg:
            x = x[:, 1:]
        if loss_mask is not None:
            x = x * loss_mask
        intersect = (x * y_onehot).sum(axes, dtype=torch.float32)
        sum_pred = x.sum(axes, dtype=torch.float32)
        if self.batch_dice:  # over the global batch in a data-parallel training, as one process would
            intersect, sum_pred, sum_gt = (sum_over_ranks(t.sum(0)) for t in (intersect, sum_pred, sum_gt))
        dice = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        return -dice.mean()


class DiceCELoss(nn.Module):
    """weight_ce * cross-entropy + weight_dice * soft Dice (softmax, background excluded) for label maps.

    Voxels with the ignore label count in neither term; a batch made only of ignored voxels gives a CE of 0.
    """

    def __init__(self, batch_dice: bool = False, do_bg: bool = False, smooth: float = 1e-5,
                 weight_ce: float = 1.0, weight_dice: float = 1.0, ignore_label: int | None = None):
        super().__init__()
        self.weight_ce, self.weight_dice, self.ignore_label = weight_ce, weight_dice, ignore_label
        self.dice = SoftDiceLoss("softmax", batch_dice=batch_dice, do_bg=do_bg, smooth=smooth)
        # -100 is torch's default "ignore nothing" index
        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_label if ignore_label is not None else -100)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss for logits `(B, K, ...)` and class indices `(B, 1, ...)`."""
        if target.ndim != logits.ndim or target.shape[1] != 1:
            raise ValueError(f"DiceCELoss needs class indices (B, 1, ...); got target {tuple(target.shape)}")
        target = target.long()
        if self.ignore_label is not None:
            mask = target != self.ignore_label
            target_dice = torch.where(mask, target, torch.zeros_like(target))
            n_annotated = int(mask.sum())
        else:
            mask, target_dice, n_annotated = None, target, -1
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_dice:
            loss = loss + self.weight_dice * self.dice(logits, target_dice, loss_mask=mask)
        if self.weight_ce and n_annotated != 0:
            loss = loss + self.weight_ce * self.ce(logits, target[:, 0])
        return loss


class DiceBCELoss(nn.Module):
    """weight_ce * binary cross-entropy + weight_dice * soft Dice (sigmoid, all channels) for region masks.

    If the target has one channel more than the logits, its last channel marks ignored voxels (nnU-Net's
    convention for region training with an ignore label); they count in neither term. The BCE is then the
    mean over annotated voxels and regions; nnU-Net 2.8.1 divides the sum over regions by the number of
    annotated voxels only (R times larger), which samplan does not copy: the CE/Dice balance stays the
    same with and without an ignore label.
    """

    def __init__(self, batch_dice: bool = False, do_bg: bool = True, smooth: float = 1e-5,
                 weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.weight_ce, self.weight_dice = weight_ce, weight_dice
        self.dice = SoftDiceLoss("sigmoid", batch_dice=batch_dice, do_bg=do_bg, smooth=smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss for logits `(B, R, ...)` and region masks `(B, R[+1], ...)`."""
        mask = None
        if target.shape[1] == logits.shape[1] + 1:
            mask = (target[:, -1:] == 0).float()
            target = target[:, :-1]
        target = target.float()
        dice = self.dice(logits, target, loss_mask=mask)
        bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        if mask is None:
            bce = bce.mean()
        else:
            bce = (bce * mask).sum() / (mask.sum() * logits.shape[1]).clamp_min(1e-8)
        return self.weight_ce * bce + self.weight_dice * dice


class DeepSupervisionLoss(nn.Module):
    """sum_i weights[i] * loss(outputs[i], targets[i]) over the decoder outputs (full resolution first).

    Outputs with weight 0 are skipped (not even computed), as nnU-Net skips its lowest resolution.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float]):
        super().__init__()
        if not any(w != 0 for w in weights):
            raise ValueError("at least one deep supervision weight must be non-zero")
        self.loss, self.weights = loss, tuple(float(w) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the wrapped loss over (output, target) pairs."""
        if not isinstance(outputs, (list, tuple)) or not isinstance(targets, (list, tuple)):
            raise TypeError("deep supervision needs lists of outputs and targets; is the network's deep supervision on?")
        if len(outputs) != len(targets) or len(outputs) > len(self.weights):
            raise ValueError(
                f"deep supervision got {len(outputs)} outputs, {len(targets)} targets and {len(self.weights)} weights"
            )
        return sum(w * self.loss(o, t) for w, o, t in zip(self.weights, outputs, targets) if w != 0)


def build_segmentation_loss(
    has_regions: bool,
    *,
    batch_dice: bool,
    ignore_label: int | None = None,
    smooth: float = 1e-5,
    weight_ce: float = 1.0,
    weight_dice: float = 1.0,
    deep_supervision_weights: Sequence[float] | None = None,
) -> nn.Module:
    """nnU-Net's default loss: Dice+BCE for regions (Dice over every region), Dice+CE otherwise (no background
    Dice), wrapped for deep supervision when weights are given."""
    if has_regions:
        loss: nn.Module = DiceBCELoss(batch_dice, True, smooth, weight_ce, weight_dice)
    else:
        loss = DiceCELoss(batch_dice, False, smooth, weight_ce, weight_dice, ignore_label)
    return DeepSupervisionLoss(loss, deep_supervision_weights) if deep_supervision_weights is not None else loss
