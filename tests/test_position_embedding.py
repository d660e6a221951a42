"""Resizing SAM ViT position embeddings / relative-position tables and adapting the patch embedding."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

from samplan.errors import SamplanError
from samplan.models.position_embedding import adapt_patch_embed, resize_position_embeddings, resize_rel_pos

EMBED, HEADS, WINDOW, GLOBAL = 32, 2, 14, (1,)


def _encoder(size: int, seed: int) -> ImageEncoderViT:
    """A small SAM ViT (embed 32, depth 2, 2 heads, window 14, block 1 global) at `size` input, in eval mode."""
    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=size, patch_size=16, in_chans=3, embed_dim=EMBED, depth=2, num_heads=HEADS,
                          mlp_ratio=4, out_chans=32, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, window_size=WINDOW, global_attn_indexes=GLOBAL)
    with torch.no_grad():
        # SAM initialises pos_embed and the rel-pos tables to zeros: random values make the resize observable
        enc.pos_embed.normal_(0, 0.5)
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
    return enc.eval()


@pytest.fixture(scope="module")
def encoder_1024() -> ImageEncoderViT:
    return _encoder(1024, seed=0)


def test_same_size_round_trip_is_exact(encoder_1024: ImageEncoderViT) -> None:
    state = resize_position_embeddings(encoder_1024.state_dict(), 1024)
    fresh = _encoder(1024, seed=1)
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fresh(x), encoder_1024(x))


@pytest.mark.parametrize("size", [256, 512])
def test_resized_state_dict_fits_smaller_encoder(encoder_1024: ImageEncoderViT, size: int) -> None:
    old = encoder_1024.state_dict()
    state = resize_position_embeddings(encoder_1024, size, global_attn_indexes=GLOBAL)
    g = size // 16
    head_dim = EMBED // HEADS
    assert state["pos_embed"].shape == (1, g, g, EMBED)
    for axis in "hw":
        assert state[f"blocks.1.attn.rel_pos_{axis}"].shape == (2 * g - 1, head_dim)  # global: grid g -> 2g-1 rows
        assert torch.equal(state[f"blocks.0.attn.rel_pos_{axis}"], old[f"blocks.0.attn.rel_pos_{axis}"])
        assert state[f"blocks.0.attn.rel_pos_{axis}"].shape == (2 * WINDOW - 1, head_dim)  # windowed: unchanged
    # the caller's state dict is untouched (a copy is returned)
    assert old["pos_embed"].shape == (1, 64, 64, EMBED)
    # without global_attn_indexes the global tables are recognised by their 2*64-1 rows
    assert {k: v.shape for k, v in resize_position_embeddings(old, size).items()} == {k: v.shape for k, v in state.items()}

    small = _encoder(size, seed=3)
    small.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = small(torch.randn(1, 3, size, size))
    assert out.shape == (1, 32, g, g) and torch.isfinite(out).all()


def test_pos_embed_resize_keeps_smooth_content() -> None:
    # a position embedding that is a linear ramp along the rows stays one after resizing (no axis swap)
    ramp = torch.linspace(-1, 1, 64).view(1, 64, 1, 1).expand(1, 64, 64, 4).contiguous()
    enc_state = {"pos_embed": ramp}
    out = resize_position_embeddings(enc_state, 512)["pos_embed"]
    assert out.shape == (1, 32, 32, 4)
    rows = out[0, :, 0, 0]
    assert torch.all(rows[1:] > rows[:-1]) and torch.allclose(out[0, :, :, :], rows.view(32, 1, 1).expand(32, 32, 4))


def test_rel_pos_resize_matches_sam_runtime_interpolation() -> None:
    # SAM itself interpolates a table of the wrong length at run time; the stored resize must agree with it
    table = torch.randn(127, 16)
    for grid in (16, 32):
        resized = resize_rel_pos(table, 2 * grid - 1)
        assert torch.allclose(get_rel_pos(grid, grid, resized), get_rel_pos(grid, grid, table), atol=1e-6)


def test_prefixed_full_model_keys_and_errors() -> None:
    enc = _encoder(256, seed=4)
    full = {f"image_encoder.{k}": v for k, v in enc.state_dict().items()}
    full["mask_decoder.some.weight"] = torch.ones(3)
    out = resize_position_embeddings(full, 128, global_attn_indexes=GLOBAL)
    assert out["image_encoder.pos_embed"].shape == (1, 8, 8, EMBED)
    assert out["image_encoder.blocks.1.attn.rel_pos_h"].shape == (15, EMBED // HEADS)
    assert torch.equal(out["mask_decoder.some.weight"], torch.ones(3))
    with pytest.raises(SamplanError, match="multiple of the patch size"):
        resize_position_embeddings(full, 100)
    with pytest.raises(SamplanError, match="no 'pos_embed'"):
        resize_position_embeddings({"mask_decoder.some.weight": torch.ones(3)}, 256)


def test_adapt_patch_embed_channels() -> None:
    weight = torch.randn(8, 3, 16, 16)
    one = adapt_patch_embed(weight, 1)
    assert one.shape == (8, 1, 16, 16) and torch.allclose(one[:, 0], weight.mean(dim=1))
    three = adapt_patch_embed(weight, 3)
    assert torch.equal(three, weight) and three.data_ptr() != weight.data_ptr()
    five = adapt_patch_embed(weight, 5)
    assert five.shape == (8, 5, 16, 16)
    assert torch.allclose(five[:, 0], weight[:, 0]) and torch.allclose(five[:, 4], weight[:, 2])
    assert torch.allclose(five[:, 2], weight[:, 1])  # the middle of five sits on G
    assert torch.allclose(five[:, 1], (weight[:, 0] + weight[:, 1]) / 2, atol=1e-6)
    with pytest.raises(SamplanError):
        adapt_patch_embed(weight, 0)
    with pytest.raises(SamplanError):
        adapt_patch_embed(weight[0], 1)
