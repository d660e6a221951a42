"""Losses against values computed by hand (plain Python arithmetic on small tensors)."""
from __future__ import annotations

import math

import pytest
import torch

from samplan.engine.losses import (DeepSupervisionLoss, DiceBCELoss, DiceCELoss, SoftDiceLoss,
                                     build_segmentation_loss)

SMOOTH = 1e-5


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


def _hand_dice(probs: list[list[float]], labels: list[int], classes: list[int]) -> list[float]:
    """Soft Dice per class from per-voxel probability lists and integer labels."""
    out = []
    for k in classes:
        inter = sum(p[k] for p, l in zip(probs, labels) if l == k)
        pred = sum(p[k] for p in probs)
        gt = sum(1 for l in labels if l == k)
        out.append((2 * inter + SMOOTH) / (pred + gt + SMOOTH))
    return out


def _logits_and_labels(seed: int, b: int, k: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, n, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (b, 1, n), generator=g)
    return x, y


def test_soft_dice_per_sample_and_batch_by_hand():
    x, y = _logits_and_labels(0, 2, 3, 7)
    per_sample = []
    inter, pred, gt = [0.0] * 3, [0.0] * 3, [0.0] * 3
    for b in range(2):
        probs = [_softmax([float(x[b, c, i]) for c in range(3)]) for i in range(7)]
        labels = [int(y[b, 0, i]) for i in range(7)]
        per_sample += _hand_dice(probs, labels, [1, 2])
        for k in (1, 2):
            inter[k] += sum(p[k] for p, l in zip(probs, labels) if l == k)
            pred[k] += sum(p[k] for p in probs)
            gt[k] += sum(1 for l in labels if l == k)
    batch = [(2 * inter[k] + SMOOTH) / (pred[k] + gt[k] + SMOOTH) for k in (1, 2)]
    got = SoftDiceLoss("softmax", batch_dice=False, do_bg=False)(x, y)
    got_batch = SoftDiceLoss("softmax", batch_dice=True, do_bg=False)(x, y)
    assert float(got) == pytest.approx(-sum(per_sample) / len(per_sample), rel=1e-6)
    assert float(got_batch) == pytest.approx(-sum(batch) / 2, rel=1e-6)
    assert float(got) != pytest.approx(float(got_batch))  # the two modes really differ here


def test_dice_ce_by_hand():
    x, y = _logits_and_labels(1, 1, 3, 9)
    probs = [_softmax([float(x[0, c, i]) for c in range(3)]) for i in range(9)]
    labels = [int(y[0, 0, i]) for i in range(9)]
    ce = -sum(math.log(p[l]) for p, l in zip(probs, labels)) / 9
    dice = sum(_hand_dice(probs, labels, [1, 2])) / 2
    assert float(DiceCELoss()(x, y)) == pytest.approx(ce - dice, rel=1e-6)
    assert float(DiceCELoss(weight_ce=0.5, weight_dice=2.0)(x, y)) == pytest.approx(0.5 * ce - 2 * dice, rel=1e-6)


def test_dice_ce_ignore_label_equals_loss_on_annotated_voxels():
    x, y = _logits_and_labels(2, 1, 3, 12)
    y[0, 0, [1, 4, 5, 10]] = 3  # label 3 is the ignore label
    keep = y[0, 0] != 3
    full = DiceCELoss(ignore_label=3)(x, y)
    subset = DiceCELoss()(x[:, :, keep], y[:, :, keep])
    assert float(full) == pytest.approx(float(subset), rel=1e-6)
    x2 = x.clone()
    x2[:, :, ~keep] += 5.0  # predictions on ignored voxels do not matter
    assert float(DiceCELoss(ignore_label=3)(x2, y)) == pytest.approx(float(full), rel=1e-6)
    only_ignored = torch.full_like(y, 3)
    assert torch.isfinite(DiceCELoss(ignore_label=3)(x, only_ignored))


def test_dice_bce_by_hand_and_ignore_channel():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    t = (torch.rand(1, 2, 6, generator=g) > 0.5).double()
    sig = [[1 / (1 + math.exp(-float(x[0, r, i]))) for i in range(6)] for r in range(2)]
    bce = -sum(float(t[0, r, i]) * math.log(sig[r][i]) + (1 - float(t[0, r, i])) * math.log(1 - sig[r][i])
               for r in range(2) for i in range(6)) / 12
    dice = [(2 * sum(sig[r][i] * float(t[0, r, i]) for i in range(6)) + SMOOTH)
            / (sum(sig[r]) + float(t[0, r].sum()) + SMOOTH) for r in range(2)]
    assert float(DiceBCELoss()(x, t)) == pytest.approx(bce - sum(dice) / 2, rel=1e-6)

    ignore = torch.tensor([[[0, 1, 0, 0, 1, 0]]], dtype=torch.float64)
    keep = ignore[0, 0] == 0
    with_ignore = DiceBCELoss()(x, torch.cat([t, ignore], 1))
    assert float(with_ignore) == pytest.approx(float(DiceBCELoss()(x[:, :, keep], t[:, :, keep])), rel=1e-6)


def test_deep_supervision_weights_and_skipped_outputs():
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, o, t):
            calls.append(o.shape[-1])
            return o.sum() * 0 + float(o.shape[-1])

    loss = DeepSupervisionLoss(Recorder(), [0.5, 0.3, 0.0])
    outs = [torch.zeros(1, 1, 8), torch.zeros(1, 1, 4), torch.zeros(1, 1, 2)]
    assert float(loss(outs, outs)) == pytest.approx(0.5 * 8 + 0.3 * 4)
    assert calls == [8, 4]  # weight 0: never computed
    with pytest.raises(TypeError):
        loss(outs[0], outs[0])
    with pytest.raises(ValueError):
        DeepSupervisionLoss(Recorder(), [0.0, 0.0])


def test_build_segmentation_loss_kinds():
    x, y = _logits_and_labels(4, 2, 3, 8)
    plain = build_segmentation_loss(False, batch_dice=True)
    assert isinstance(plain, DiceCELoss) and plain.dice.batch_dice and not plain.dice.do_bg
    regions = build_segmentation_loss(True, batch_dice=False)
    assert isinstance(regions, DiceBCELoss) and regions.dice.do_bg
    ds = build_segmentation_loss(False, batch_dice=False, deep_supervision_weights=[2 / 3, 1 / 3])
    small_x, small_y = x[..., ::2], y[..., ::2]
    expected = 2 / 3 * float(DiceCELoss()(x, y)) + 1 / 3 * float(DiceCELoss()(small_x, small_y))
    assert float(ds([x, small_x], [y, small_y])) == pytest.approx(expected, rel=1e-6)


def test_loss_gradients_flow_to_logits():
    x, y = _logits_and_labels(5, 2, 3, 10)
    x.requires_grad_(True)
    DiceCELoss()(x, y).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
