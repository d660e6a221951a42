"""DiceFocal loss against a plain per-element computation, ignored pixels, and its minimum at the target."""
from __future__ import annotations

import math

import pytest
import torch

from samplan.engine.dice_focal import DiceFocalLoss


def _reference_softmax(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0) -> float:
    """Dice (per sample and class, background included) + focal, written element by element."""
    b, k, h, w = logits.shape
    p = torch.softmax(logits.double(), 1)
    dice_terms, focal_sum = [], 0.0
    for i in range(b):
        for c in range(k):
            g = (labels[i, 0] == c).double()
            inter, ps, gs = float((p[i, c] * g).sum()), float(p[i, c].sum()), float(g.sum())
            dice_terms.append(1 - (2 * inter + 1e-5) / (ps + gs + 1e-5))
            for y in range(h):
                for x in range(w):
                    if g[y, x]:
                        pc = float(p[i, c, y, x])
                        focal_sum += -((1 - pc) ** gamma) * math.log(pc)
    return sum(dice_terms) / len(dice_terms) + focal_sum / (b * k * h * w)


def test_softmax_matches_the_elementwise_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4)
    labels = torch.randint(0, 3, (2, 1, 5, 4))
    got = float(DiceFocalLoss(softmax=True)(logits, labels))
    assert got == pytest.approx(_reference_softmax(logits, labels), rel=1e-5)


def test_sigmoid_regions_match_the_elementwise_definition():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 4, 4)
    target = (torch.rand(1, 2, 4, 4) > 0.5).float()
    p = torch.sigmoid(logits.double())
    g = target.double()
    bce = -(g * torch.log(p) + (1 - g) * torch.log(1 - p))
    p_true = p * g + (1 - p) * (1 - g)
    focal = float(((1 - p_true) ** 2 * bce).mean())
    dice = 1 - (2 * (p * g).sum((2, 3)) + 1e-5) / (p.sum((2, 3)) + g.sum((2, 3)) + 1e-5)
    got = float(DiceFocalLoss(softmax=False)(logits, target))
    assert got == pytest.approx(float(dice.mean()) + focal, rel=1e-5)


def test_ignored_pixels_do_not_count():
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 6, 6)
    labels = torch.randint(0, 3, (1, 1, 6, 6))
    loss = DiceFocalLoss(softmax=True, ignore_label=3)
    noisy_logits = logits.clone()
    labels_ign = labels.clone()
    labels_ign[..., :2, :] = 3  # top two rows ignored ...
    noisy_logits[..., :2, :] = torch.randn(1, 3, 2, 6) * 50  # ... so what the network says there does not matter
    assert float(loss(logits, labels_ign)) == pytest.approx(float(loss(noisy_logits, labels_ign)), rel=1e-6)


def test_confident_correct_prediction_is_near_zero():
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    perfect = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float() * 40 - 20
    assert float(DiceFocalLoss()(perfect, labels)) < 1e-3
    assert float(DiceFocalLoss()(-perfect, labels)) > 0.9
