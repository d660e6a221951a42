"""Round trips through samplan.dataset.image_io: arrays, spacing and geometry survive read -> write -> read."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from samplan.dataset.image_io import read_images, read_seg, write_seg
from samplan.errors import DatasetError


def _rotation(ax: float, az: float) -> np.ndarray:
    """A proper rotation (det +1): about x by `ax`, then about z by `az` (radians)."""
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


# ITK stores directions in LPS; an image in RAS orientation has the first two axes flipped
DIRECTIONS = {
    "LPS_oblique": _rotation(0.2, 0.5),
    "RAS_oblique": np.diag([-1.0, -1.0, 1.0]) @ _rotation(-0.15, 0.3),
}
SPACING_XYZ = (0.7, 0.9, 2.5)  # anisotropic; numpy order is (2.5, 0.9, 0.7)
ORIGIN = (-12.5, 30.25, 7.0)


def _write_volume(arr_zyx: np.ndarray, path, direction: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN)
    img.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(img, str(path))
    return img


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("orientation", sorted(DIRECTIONS))
def test_volume_and_label_round_trip(tmp_path, ending, orientation):
    rng = np.random.default_rng(1)
    image = rng.normal(100, 20, (7, 9, 11)).astype(np.float32)
    direction = DIRECTIONS[orientation]
    _write_volume(image, tmp_path / f"img{ending}", direction)

    data, props = read_images([tmp_path / f"img{ending}"])
    assert data.shape == (1, 7, 9, 11) and data.dtype == np.float32
    np.testing.assert_array_equal(data[0], image)  # no reorientation: numpy axis order of the file
    np.testing.assert_allclose(props["spacing"], SPACING_XYZ[::-1], atol=1e-6)
    # NIfTI keeps its header in float32, hence 1e-5 against the float64 we wrote
    np.testing.assert_allclose(props["geometry"]["direction"], direction.ravel(), atol=1e-5)
    np.testing.assert_allclose(props["geometry"]["origin"], ORIGIN, atol=1e-4)

    seg = np.zeros((7, 9, 11), np.uint8)
    seg[2:5, 3:7, 1:4] = 1
    seg[4:6, 1:3, 6:10] = 3
    write_seg(seg, tmp_path / f"seg{ending}", props)
    seg_back, seg_props = read_seg(tmp_path / f"seg{ending}")
    assert seg_back.shape == (1, 7, 9, 11)
    np.testing.assert_array_equal(seg_back[0], seg)
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(seg_props["geometry"][key], props["geometry"][key], atol=1e-6, err_msg=key)
    np.testing.assert_allclose(seg_props["spacing"], props["spacing"], atol=1e-6)
    # the write is atomic: only the two files we asked for are left in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"img{ending}", f"seg{ending}"])


def test_channels_stack_and_grid_mismatch_names_file(tmp_path):
    rng = np.random.default_rng(2)
    a, b = (rng.normal(size=(5, 6, 7)).astype(np.float32) for _ in range(2))
    _write_volume(a, tmp_path / "c_0000.nii.gz", DIRECTIONS["LPS_oblique"])
    _write_volume(b, tmp_path / "c_0001.nii.gz", DIRECTIONS["LPS_oblique"])
    data, _ = read_images([tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"])
    assert data.shape == (2, 5, 6, 7)
    np.testing.assert_array_equal(data[1], b)

    _write_volume(b, tmp_path / "c_0002.nii.gz", DIRECTIONS["RAS_oblique"])
    with pytest.raises(DatasetError, match="c_0002.nii.gz"):
        read_images([tmp_path / "c_0000.nii.gz", tmp_path / "c_0002.nii.gz"])


def test_int16_label_values_survive(tmp_path):
    _write_volume(np.zeros((3, 4, 5), np.float32), tmp_path / "ref.nii.gz", np.eye(3))
    _, props = read_images([tmp_path / "ref.nii.gz"])
    seg = np.zeros((3, 4, 5), np.int16)
    seg[1, 2, 3] = 300
    write_seg(seg, tmp_path / "seg.nii.gz", props)
    back, _ = read_seg(tmp_path / "seg.nii.gz")
    assert back.dtype == np.int16 and back.max() == 300 and back.sum() == 300


def test_png_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    rgba = np.concatenate([rgb, np.full((30, 40, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")

    g, gprops = read_images([tmp_path / "g.png"])
    assert g.shape == (1, 1, 30, 40) and gprops["spacing"] == [999.0, 1.0, 1.0]
    np.testing.assert_array_equal(g[0, 0], grey)
    c, _ = read_images([tmp_path / "c.png"])
    assert c.shape == (3, 1, 30, 40)  # one RGB file gives three channels, in R, G, B order
    for ch in range(3):
        np.testing.assert_array_equal(c[ch, 0], rgb[..., ch])
    a, _ = read_images([tmp_path / "a.png"])
    np.testing.assert_array_equal(a, c)  # alpha dropped


def test_png_label_round_trip(tmp_path):
    Image.fromarray(np.zeros((25, 33), np.uint8)).save(tmp_path / "ref.png")
    _, props = read_images([tmp_path / "ref.png"])
    seg = np.zeros((1, 25, 33), np.uint8)
    seg[0, 5:15, 10:20] = 1
    seg[0, 18:22, 2:30] = 2
    write_seg(seg, tmp_path / "seg.png", props)
    back, back_props = read_seg(tmp_path / "seg.png")
    assert back.shape == (1, 1, 25, 33)
    np.testing.assert_array_equal(back[0], seg)
    assert back_props["geometry"]["shape"] == [25, 33]


def test_palette_png_label_keeps_indices(tmp_path):
    """VOC-style masks are palette images whose pixel values are the label indices."""
    seg = np.zeros((20, 24), np.uint8)
    seg[3:9, 4:12] = 1
    seg[12:18, 14:20] = 2
    im = Image.fromarray(seg, "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "mask.png")
    back, _ = read_seg(tmp_path / "mask.png")
    assert back.shape == (1, 1, 20, 24)
    np.testing.assert_array_equal(back[0, 0], seg)
    # as an image, the same file is shown in its colours
    colours, _ = read_images([tmp_path / "mask.png"])
    assert colours.shape == (3, 1, 20, 24) and colours[0, 0, 5, 5] == 255


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_2d_sitk_image(tmp_path, ending):
    rng = np.random.default_rng(4)
    arr = rng.normal(size=(21, 17)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.8))
    img.SetOrigin((3.0, -4.0))
    img.SetDirection((0.0, 1.0, 1.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / f"s{ending}"))

    data, props = read_images([tmp_path / f"s{ending}"])
    assert data.shape == (1, 1, 21, 17)
    np.testing.assert_array_equal(data[0, 0], arr)
    assert props["spacing"][1:] == pytest.approx([0.8, 0.5])
    assert props["spacing"][0] == pytest.approx(999 * 0.8)  # dummy out-of-plane spacing, larger than any real one
    assert props["geometry"]["ndim"] == 2

    seg = (arr > 0).astype(np.uint8)[None]
    write_seg(seg, tmp_path / f"seg{ending}", props)
    back, back_props = read_seg(tmp_path / f"seg{ending}")
    assert back.shape == (1, 1, 21, 17)
    np.testing.assert_array_equal(back[0], seg)
    raw = sitk.ReadImage(str(tmp_path / f"seg{ending}"))
    assert raw.GetDimension() == 2
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(back_props["geometry"][key], props["geometry"][key], atol=1e-6, err_msg=key)


def test_missing_file_named(tmp_path):
    with pytest.raises(DatasetError, match="nothere_0000.nii.gz"):
        read_images([tmp_path / "nothere_0000.nii.gz"])
    with pytest.raises(DatasetError, match="nothere.png"):
        read_seg(tmp_path / "nothere.png")


def test_unsupported_ending_named(tmp_path):
    f = tmp_path / "scan_0000.xyz"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(DatasetError, match=r"scan_0000\.xyz.*unsupported file ending") as e:
        read_images([f])
    assert ".nii.gz" in str(e.value)  # the message lists what is supported


@pytest.mark.parametrize("name", ["broken_0000.nii.gz", "broken_0000.png", "broken_0000.mha"])
def test_corrupt_file_named(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
        read_images([f])


def test_non_integer_label_rejected(tmp_path):
    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 1, 1] = 0.5
    _write_volume(arr, tmp_path / "soft.nii.gz", np.eye(3))
    with pytest.raises(DatasetError, match="soft.nii.gz"):
        read_seg(tmp_path / "soft.nii.gz")


def test_16bit_png_mask_values_not_wrapped(tmp_path):
    """A 0/65535 mask (a common 16-bit export) must read as 65535, not wrap to -1, so verify can name the value."""
    mask = np.zeros((10, 12), np.uint16)
    mask[2:5, 3:6] = 65535
    Image.fromarray(mask).save(tmp_path / "m16.png")
    seg, _ = read_seg(tmp_path / "m16.png")
    assert sorted(np.unique(seg).tolist()) == [0, 65535]
    img, _ = read_images([tmp_path / "m16.png"])
    assert img.shape == (1, 1, 10, 12) and img.max() == 65535.0


def test_pixel_limit_refuses_large_images(tmp_path, monkeypatch):
    f = tmp_path / "wide_0000.png"
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(f)
    monkeypatch.setenv("SAMPLAN_MAX_IMAGE_PIXELS", "100000")
    for check in (True, False):  # the PNG header check, and PIL's own bomb check behind it
        with pytest.raises(DatasetError, match=r"wide_0000\.png.*100000 pixels.*SAMPLAN_MAX_IMAGE_PIXELS"):
            read_images([f], check=check)
    monkeypatch.setenv("SAMPLAN_MAX_IMAGE_PIXELS", "120000")
    assert read_images([f])[0].shape == (1, 1, 300, 400)


def test_byte_limit_refuses_large_volume_before_reading(tmp_path, monkeypatch):
    f = tmp_path / "vol_0000.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30, 40), np.float32)), str(f))  # 96000 bytes
    monkeypatch.setenv("SAMPLAN_MAX_IMAGE_BYTES", "50000")
    for check in (True, False):  # the header check of integrity, and ReadImageInformation in the reader
        with pytest.raises(DatasetError, match=r"vol_0000\.nrrd.*above the limit.*SAMPLAN_MAX_IMAGE_BYTES"):
            read_images([f], check=check)
    monkeypatch.setenv("SAMPLAN_MAX_IMAGE_BYTES", "96000")
    assert read_images([f])[0].shape == (1, 20, 30, 40)
