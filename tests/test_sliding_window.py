"""Sliding-window positions, the Gaussian importance map, padding, and dense prediction with mirroring TTA."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from samplan.engine.dense import flip_combinations, predict_dense
from samplan.engine.sliding_window import compute_steps, gaussian_importance_map, pad_to_patch, window_starts


def _plans(patch, batch_size=2):
    name = "3d_fullres" if len(patch) == 3 else "2d"
    return {"configurations": {name: {"patch_size": list(patch), "batch_size": batch_size}}}, name


# ------------------------------------------------------------------------------------------------ steps


@pytest.mark.parametrize("n,p", [(110, 64), (64, 64), (65, 64), (200, 32), (47, 20), (128, 96), (33, 1)])
def test_steps_cover_the_image_with_the_fewest_half_overlapping_windows(n, p):
    (steps,) = compute_steps([n], [p], 0.5)
    assert steps[0] == 0 and steps[-1] == n - p
    assert steps == sorted(set(steps))
    covered = np.zeros(n, bool)
    for s in steps:
        covered[s : s + p] = True
    assert covered.all()
    gaps = np.diff(steps)
    assert np.all(gaps <= p * 0.5 + 0.5)  # never further apart than half a patch (up to rounding)
    if len(steps) > 1:  # one window fewer could not keep that spacing
        assert (n - p) / max(len(steps) - 2, 1e-9) > p * 0.5 or len(steps) == 2
    assert (gaps.max() - gaps.min() <= 1) if len(gaps) else True  # evenly spread


def test_steps_nnunet_documented_example_and_equal_sizes():
    # nnU-Net's comment: image 110, patch 64, step 0.5 -> three windows at 0, 23, 46
    assert compute_steps([110, 64, 70], [64, 64, 64], 0.5) == [[0, 23, 46], [0], [0, 6]]
    assert compute_steps([40, 56, 40], [40, 56, 40]) == [[0], [0], [0]]
    assert compute_steps([100], [50], 1.0) == [[0, 50]]  # step 1: no overlap at all when it fits


def test_steps_refuse_an_image_smaller_than_the_patch():
    with pytest.raises(ValueError, match="pad it first"):
        compute_steps([30, 64], [32, 64])


def test_window_starts_2d_slices_take_every_slice():
    starts = window_starts((5, 40, 30), (1, 32, 30), 0.5, slice_axis_every_voxel=True)
    assert sorted({s[0] for s in starts}) == [0, 1, 2, 3, 4]
    assert sorted({s[1] for s in starts}) == [0, 8] and {s[2] for s in starts} == {0}
    assert len(starts) == 5 * 2


def test_padding_is_centred_and_reversible():
    data = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded, keep = pad_to_patch(data, (8, 4, 10))
    assert padded.shape == (2, 8, 5, 10)
    assert keep == (slice(2, 5), slice(0, 5), slice(1, 8))  # (8-3)//2 = 2 before, 3 after
    torch.testing.assert_close(padded[(slice(None), *keep)], data)
    assert padded.sum() == data.sum()  # zeros only
    same, keep2 = pad_to_patch(data, (3, 5, 7))
    assert same is data and keep2 == (slice(0, 3), slice(0, 5), slice(0, 7))


# ------------------------------------------------------------------------------------------------ Gaussian


@pytest.mark.parametrize("patch", [(9, 17, 13), (8, 16, 12), (48, 160, 128), (33, 64)])
def test_gaussian_peaks_at_the_centre_is_symmetric_and_never_zero(patch):
    g = gaussian_importance_map(patch).numpy()
    assert g.shape == patch and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0, abs=1e-6) and g.min() > 0
    for axis in range(len(patch)):
        np.testing.assert_allclose(g, np.flip(g, axis), rtol=1e-6)
    centre = tuple(n // 2 for n in patch)
    assert g[centre] == pytest.approx(1.0, abs=0.01 if all(n > 10 for n in patch) else 0.05)
    # separable with sigma = patch / 8 along each axis: one sigma from the centre the weight is exp(-1/2)
    if patch[0] % 2 == 1:
        n0 = patch[0]
        off = (n0 - 1) // 2
        line = g[(slice(None), *(c for c in centre[1:]))] / g[centre]
        x = np.arange(n0) - off
        np.testing.assert_allclose(line, np.exp(-0.5 * (x / (n0 / 8)) ** 2), rtol=1e-4, atol=1e-7)
    # a returned map can be changed by the caller without changing the next one
    t = gaussian_importance_map(patch)
    t.zero_()
    assert gaussian_importance_map(patch).max() == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ dense prediction


class Pointwise(nn.Module):
    """Logits are a fixed per-voxel function of the image: class k gets a_k * x + b_k (1x1 convolution)."""

    def __init__(self, dim: int, a=(0.0, 1.0, -1.0), b=(0.0, -0.5, -0.2)):
        super().__init__()
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        self.conv = conv(1, len(a), 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(a).reshape(len(a), 1, *[1] * dim))
            self.conv.bias.copy_(torch.tensor(b))

    def forward(self, x):
        return self.conv(x)


class PositionBias(nn.Module):
    """Adds a fixed bias that depends on the position inside the window: exposes how windows are blended."""

    def __init__(self, patch):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x + self.bias


class DeepSupervision(nn.Module):
    """Returns [full-resolution logits, a downsampled copy] like a deep-supervision U-Net."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return [out, out[(slice(None), slice(None), *[slice(None, None, 2)] * (x.ndim - 2))]]


def test_3d_sliding_window_of_a_pointwise_net_equals_the_whole_image_prediction():
    torch.manual_seed(0)
    data = torch.randn(1, 21, 37, 30)
    plans, cfg = _plans((8, 16, 12))
    net = Pointwise(3)
    logits = predict_dense(net, data, plans, cfg, mirror_axes=(), device="cpu")
    assert logits.shape == (3, 21, 37, 30) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, net(data[None])[0].detach(), rtol=1e-5, atol=1e-5)
    # the expected segmentation is known: class 1 where x > 0.5, class 2 where x < -0.2, else 0
    seg = logits.argmax(0)
    expected = torch.where(data[0] > 0.5, 1, torch.where(data[0] < -0.2, 2, 0))
    assert (seg == expected).float().mean() > 0.999
    # mirroring a mirror-equivariant net changes nothing
    tta = predict_dense(net, data, plans, cfg, mirror_axes=(0, 1, 2), device="cpu")
    torch.testing.assert_close(tta, logits, rtol=1e-5, atol=1e-5)
    # deep-supervision outputs: only the full-resolution one is used
    ds = predict_dense(DeepSupervision(net), data, plans, cfg, mirror_axes=(1,), device="cpu")
    torch.testing.assert_close(ds, logits, rtol=1e-5, atol=1e-5)


def test_windows_are_blended_with_the_gaussian_weights():
    torch.manual_seed(1)
    patch, shape = (6, 8, 10), (11, 13, 10)
    data = torch.randn(1, *shape)
    plans, cfg = _plans(patch, batch_size=3)
    net = PositionBias(patch)
    out = predict_dense(net, data, plans, cfg, device="cpu")
    # reference: explicit weighted average over every window that covers each voxel
    g = gaussian_importance_map(patch).numpy()
    bias = net.bias.detach().numpy()[0, 0]
    num, den = np.zeros(shape), np.zeros(shape)
    steps = compute_steps(shape, patch, 0.5)
    for start in itertools.product(*steps):
        box = tuple(slice(s, s + p) for s, p in zip(start, patch))
        num[box] += g * bias
        den[box] += g
    np.testing.assert_allclose(out[0].numpy(), data[0].numpy() + num / den, rtol=1e-4, atol=1e-5)


def test_image_smaller_than_the_patch_is_padded_and_cut_back():
    torch.manual_seed(2)
    data = torch.randn(1, 5, 9, 40)
    plans, cfg = _plans((8, 16, 12))
    conv = nn.Conv3d(1, 2, 3, padding=1)
    out = predict_dense(conv, data, plans, cfg, device="cpu")
    assert out.shape == (2, 5, 9, 40)
    # zero padding before the net = the convolution's own zero padding, where one window spans an axis
    ref = conv(data[None])[0].detach()
    torch.testing.assert_close(out[:, :, :, :4], ref[:, :, :, :4], rtol=1e-4, atol=1e-5)  # x < first window overlap
    assert torch.isfinite(out).all()


def test_2d_configuration_predicts_slice_by_slice_in_batches():
    torch.manual_seed(3)
    data = torch.randn(1, 7, 20, 24)
    plans, cfg = _plans((32, 32), batch_size=3)
    conv = nn.Conv2d(1, 3, 3, padding=1)
    calls = []
    conv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    out = predict_dense(conv, data, plans, cfg, device="cpu")
    seen = list(calls)
    assert out.shape == (3, 7, 20, 24)
    ref = conv(data[0][:, None])  # (Z, 1, Y, X) -> (Z, K, Y, X): each slice on its own
    torch.testing.assert_close(out, ref.detach().permute(1, 0, 2, 3), rtol=1e-4, atol=1e-5)
    assert [c[0] for c in seen] == [3, 3, 1] and all(c[2:] == (32, 32) for c in seen)


def test_mirroring_averages_every_flip_combination():
    torch.manual_seed(4)
    data = torch.randn(1, 4, 24, 24)
    plans, cfg = _plans((24, 24))
    conv = nn.Conv2d(1, 2, 3, padding=1)  # random kernel: not mirror-equivariant
    plain = predict_dense(conv, data, plans, cfg, device="cpu")
    tta = predict_dense(conv, data, plans, cfg, mirror_axes=(0, 1), device="cpu")
    x = data[0][:, None]
    f = lambda t: conv(t).detach()  # noqa: E731
    flips = [f(x), f(x.flip(2)).flip(2), f(x.flip(3)).flip(3), f(x.flip(2, 3)).flip(2, 3)]
    torch.testing.assert_close(tta, (sum(flips) / 4).permute(1, 0, 2, 3), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tta, plain, atol=1e-3)
    assert flip_combinations((0, 1, 2), 3) == [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with pytest.raises(ValueError):
        flip_combinations((2,), 2)


def test_plain_conv_unet_with_deep_supervision():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    def build(ds):
        torch.manual_seed(5)
        return PlainConvUNet(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), 1, 3, 1, conv_bias=True,
                             norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                             nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=ds)

    data = torch.randn(1, 10, 30, 28)
    plans, cfg = _plans((8, 16, 16))
    with_ds = predict_dense(build(True), data, plans, cfg, mirror_axes=(0, 1, 2), device="cpu")
    without = predict_dense(build(False), data, plans, cfg, mirror_axes=(0, 1, 2), device="cpu")
    assert with_ds.shape == (3, 10, 30, 28)
    torch.testing.assert_close(with_ds, without)


def _whole_volume_sum(net, data, patch, batch_size):
    """The plain algorithm the band accumulator must reproduce: float32 sums over the whole padded volume."""
    padded, keep = pad_to_patch(data, patch)
    starts = window_starts(padded.shape[1:], patch, 0.5)
    g = gaussian_importance_map(patch)
    total, weights = None, torch.zeros(padded.shape[1:])
    with torch.no_grad():
        for b0 in range(0, len(starts), batch_size):
            boxes = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in starts[b0 : b0 + batch_size]]
            out = net(torch.stack([padded[(slice(None), *b)] for b in boxes])) * g
            if total is None:
                total = torch.zeros((out.shape[1], *padded.shape[1:]))
            for box, o in zip(boxes, out):
                total[(slice(None), *box)] += o
                weights[box] += g
    return (total / weights)[(slice(None), *keep)]


@pytest.mark.parametrize("shape,patch,batch", [((2, 29, 17, 13), (8, 8, 8), 2), ((2, 5, 9, 30), (8, 16, 12), 3),
                                               ((2, 24, 24, 24), (12, 12, 12), 1), ((2, 9, 40, 20), (9, 10, 10), 4)])
def test_band_accumulation_is_bit_identical_to_whole_volume_sums(shape, patch, batch):
    # the band holds one window's depth of slices; each voxel still sees the same float32 additions in order
    torch.manual_seed(4)
    data = torch.randn(shape)
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 3, 1))
    plans, cfg = _plans(patch, batch_size=batch)
    out = predict_dense(net, data, plans, cfg, device="cpu")
    assert out.dtype == torch.float32 and out.shape == (3, *shape[1:])
    assert torch.equal(out, _whole_volume_sum(net, data, patch, batch))


def test_logits_too_large_for_float32_come_back_as_float16_with_the_same_labels(monkeypatch):
    from samplan.engine import dense

    torch.manual_seed(5)
    data = torch.randn(1, 26, 30, 22)
    net = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv3d(6, 5, 1))
    plans, cfg = _plans((8, 16, 12))
    full = predict_dense(net, data, plans, cfg, device="cpu")
    monkeypatch.setattr(dense, "FLOAT32_LOGITS_MAX_BYTES", full.numel() * 4 - 1)  # one byte too small
    half = predict_dense(net, data, plans, cfg, device="cpu")
    assert half.dtype == torch.float16 and half.shape == full.shape
    # float16 keeps 11 significant bits: the logits agree to 2^-11 relative, the labels except at near-ties
    torch.testing.assert_close(half.float(), full, rtol=2**-11, atol=1e-4)
    top2 = full.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-2 * top2[0].abs().clamp_min(1)
    assert clear.float().mean() > 0.9
    assert torch.equal(half.float().argmax(0)[clear], full.argmax(0)[clear])
    # a case known to be large adds each window's share straight into float16 (no float32 band): within a few
    # float16 roundings of the float32 sums, the same labels wherever two logits do not nearly tie
    direct = predict_dense(net, data, plans, cfg, device="cpu", out_dtype=torch.float16)
    assert direct.dtype == torch.float16 and direct.shape == full.shape
    torch.testing.assert_close(direct.float(), full, rtol=4e-3, atol=2e-3)
    assert torch.equal(direct.float().argmax(0)[clear], full.argmax(0)[clear])
    # beyond float16's range a logit is clamped to its largest finite value, never inf
    big = predict_dense(Pointwise(3, a=(0.0, 1e6, -1e6), b=(0.0, 0.0, 0.0)), data, plans, cfg, device="cpu",
                        out_dtype=torch.float16)
    assert big.dtype == torch.float16 and torch.isfinite(big).all() and big.abs().max() == 65504
