"""DiceFocal loss (MONAI's DiceFocalLoss defaults, written here because MONAI is not a dependency).

loss = lambda_dice * Dice + lambda_focal * Focal, with
- Dice: per sample and channel 1 - (2 sum(p g) + 1e-5) / (sum p + sum g + 1e-5), averaged (background included);
- Focal (gamma 2): softmax: mean over all elements of -(1 - p)^gamma * g * log p (MONAI's use_softmax form);
  sigmoid: mean of (1 - p_t)^gamma * BCE(logit, g) with p_t the probability of the true value.
Targets: softmax -> class indices (B, 1, ...) made one-hot (`to_onehot_y`); sigmoid -> region masks (B, R, ...),
optionally with one extra last channel marking ignored pixels. Pixels with `ignore_label` count in neither term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiceFocalLoss(nn.Module):
    """Dice + focal loss on logits (B, K, ...) (see the module docstring for targets)."""

    def __init__(self, softmax: bool = True, gamma: float = 2.0, lambda_dice: float = 1.0, lambda_focal: float = 1.0,
                 smooth: float = 1e-5, ignore_label: int | None = None):
        super().__init__()
        self.softmax, self.gamma = bool(softmax), float(gamma)
        self.lambda_dice, self.lambda_focal, self.smooth = float(lambda_dice), float(lambda_focal), float(smooth)
        self.ignore_label = ignore_label

    def _onehot_and_mask(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(one-hot / region target like logits, valid-pixel mask (B, 1, ...)) as float32."""
        if self.softmax:
            t = target.long()
            mask = torch.ones_like(t, dtype=torch.float32)
            if self.ignore_label is not None:
                mask = (t != self.ignore_label).float()
                t = torch.where(mask.bool(), t, torch.zeros_like(t))
            onehot = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, t.clamp(0, logits.shape[1] - 1), 1.0)
            return onehot, mask
        if target.shape[1] == logits.shape[1] + 1:  # extra channel: 1 where ignored
            return target[:, :-1].float(), (target[:, -1:] == 0).float()
        return target.float(), torch.ones_like(target[:, :1], dtype=torch.float32)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss for logits (B, K, ...) and the target described in the module docstring."""
        logits = logits.float()
        g, mask = self._onehot_and_mask(logits, target)
        if self.softmax:
            logp = F.log_softmax(logits, dim=1)
            p = logp.exp()
            focal = -((1 - p) ** self.gamma) * g * logp
        else:
            p = torch.sigmoid(logits)
            p_true = p * g + (1 - p) * (1 - g)
            focal = (1 - p_true) ** self.gamma * F.binary_cross_entropy_with_logits(logits, g, reduction="none")
        focal = (focal * mask).sum() / (mask.sum() * logits.shape[1]).clamp_min(1.0)
        axes = tuple(range(2, logits.ndim))
        pm, gm = p * mask, g * mask
        inter = (pm * gm).sum(axes)
        dice = 1 - (2 * inter + self.smooth) / (pm.sum(axes) + gm.sum(axes) + self.smooth)
        return self.lambda_dice * dice.mean() + self.lambda_focal * focal
