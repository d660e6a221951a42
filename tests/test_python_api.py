"""The Python API of README.md ("Python API"): docs/python_api_example.py run on a small model equals samplan_predict
voxel for voxel and keeps the input's geometry; SimpleITK images become arrays exactly as image files do."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samplan.cli.predict import main as predict_main
from samplan.dataset.dataset_json import load_dataset_json
from samplan.dataset.image_io import read_images
from samplan.errors import InputError, SamplanError
from samplan.experiment_planning.fingerprint import extract_fingerprint
from samplan.inference.in_memory import array_properties, image_case, label_map_image, predict_sitk
from samplan.inference.predictor import Predictor
from samplan.methods import get_method
from samplan.models.checkpoint import save_checkpoint
from samplan.pipeline.planning import plan_experiment
from samplan.utils import save_json
from synthetic import make_dataset_3d

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "python_api_example.py"
# an oblique orientation (30 degrees about z, then 20 about x) and an origin away from 0: axis order and geometry
# mistakes cannot hide behind an identity matrix
_C, _S, _C2, _S2 = np.cos(np.pi / 6), np.sin(np.pi / 6), np.cos(np.pi / 9), np.sin(np.pi / 9)
DIRECTION = tuple((np.array([[1, 0, 0], [0, _C2, -_S2], [0, _S2, _C2]]) @
                   np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]])).ravel().tolist())
ORIGIN = (12.5, -40.25, 7.0)


def _oblique(image: sitk.Image) -> sitk.Image:
    image = sitk.Image(image)
    image.SetDirection(DIRECTION)
    image.SetOrigin(ORIGIN)
    return image


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A U-Net model folder as samplan_train writes it (plans, dataset.json, fold_0/checkpoint_final.pth with seeded
    random weights, a few features per stage) and an oblique input image {case}_0000.nii.gz in its own folder."""
    root = tmp_path_factory.mktemp("python_api")
    raw = make_dataset_3d(root / "raw", n_cases=2, shape=(8, 28, 24))
    dj = load_dataset_json(raw)
    fingerprint = extract_fingerprint(raw, num_processes=1, progress=False, total_intensity_samples=1e5)
    plans = plan_experiment(raw.name, dj, fingerprint, methods=["unet"])
    kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kw["features_per_stage"] = [4 * 2**i for i in range(kw["n_stages"])]
    md = root / "results" / raw.name / f"unet__{plans['plans_name']}__3d_fullres"
    save_json(plans, md / "plans.json")
    save_json(dj, md / "dataset.json")
    unet = get_method("unet")
    torch.manual_seed(0)
    net = unet.build_network(unet.check_plan(plans, "3d_fullres"), 1, 3)
    with torch.no_grad():  # a random network is nearly constant: give it a per-voxel intensity threshold as well
        net.decoder.seg_layers[-1].bias.copy_(torch.tensor([0.0, 0.3, -0.3]))
    save_checkpoint({"network_weights": net.state_dict(), "method": "unet", "configuration": "3d_fullres", "fold": 0,
                     "plans_name": plans["plans_name"], "current_epoch": 1, "num_input_channels": 1, "num_outputs": 3},
                    md / "fold_0" / "checkpoint_final.pth")
    (root / "in").mkdir()
    image_file = root / "in" / "case_000_0000.nii.gz"
    sitk.WriteImage(_oblique(sitk.ReadImage(str(raw / "imagesTr" / "case_000_0000.nii.gz"))), str(image_file))
    return md, image_file


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def test_the_readme_example_equals_samplan_predict_and_keeps_the_geometry(model, tmp_path, monkeypatch, capsys):
    md, image_file = model
    monkeypatch.setenv("SAMPLAN_RESULTS", str(md.parents[1]))
    out = tmp_path / "predict"
    assert predict_main(["-i", str(image_file.parent), "-o", str(out), "--save-probabilities"]) == 0
    from_cli = sitk.ReadImage(str(out / "case_000.nii.gz"))

    api_file = tmp_path / "api.nii.gz"
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(md), str(image_file), str(api_file)])
    names = runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "numpy and SimpleITK results agree: True" in capsys.readouterr().out

    expected = sitk.GetArrayFromImage(from_cli)
    assert len(np.unique(expected)) == 3  # a real label map (all three labels), so the comparison means something
    for result in (sitk.ReadImage(str(api_file)), names["labels"], names["seg_image"]):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(result), expected)
        assert result.GetPixelID() == from_cli.GetPixelID()
    np.testing.assert_array_equal(names["seg"], expected)
    image = sitk.ReadImage(str(image_file))
    # in memory the label map has exactly the input's grid; the two files agree within NIfTI's float32 header
    assert _geometry(names["labels"]) == _geometry(image) == _geometry(names["seg_image"])
    for written in (sitk.ReadImage(str(api_file)), from_cli):
        assert written.GetSize() == image.GetSize()
        for a, b in zip(_geometry(written)[1:], _geometry(image)[1:]):
            np.testing.assert_allclose(a, b, atol=1e-5)

    # the probabilities too: what --save-probabilities writes
    labels, probabilities = predict_sitk(names["predictor"], image, return_probabilities=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    with np.load(out / "case_000.npz") as z:
        np.testing.assert_array_equal(z["probabilities"], probabilities)


def test_images_become_arrays_as_files_do(tmp_path):
    rng = np.random.default_rng(0)
    channels = []
    for c in range(2):  # two channels of one oblique 3D grid, in a format other than NIfTI
        image = _oblique(sitk.GetImageFromArray(rng.normal(100, 20, (5, 7, 6)).astype(np.float32)))
        image.SetSpacing((0.7, 0.8, 2.5))
        sitk.WriteImage(image, str(tmp_path / f"x_{c:04d}.mha"))
        channels.append(sitk.ReadImage(str(tmp_path / f"x_{c:04d}.mha")))
    data, props = image_case(channels)
    expected, props_3d = read_images([tmp_path / f"x_{c:04d}.mha" for c in range(2)])
    assert data.shape == (2, 5, 7, 6) and data.dtype == np.float32
    np.testing.assert_array_equal(data, expected)
    assert props == props_3d and props["spacing"] == [2.5, 0.8, 0.7]

    flat = sitk.GetImageFromArray(rng.integers(0, 255, (9, 11)).astype(np.int16))  # 2D: (1, 1, Y, X), dummy spacing
    flat.SetSpacing((0.5, 0.25))
    flat.SetOrigin((3.0, -4.0))
    sitk.WriteImage(flat, str(tmp_path / "flat_0000.mha"))
    data, props = image_case(sitk.ReadImage(str(tmp_path / "flat_0000.mha")))
    expected, expected_props = read_images([tmp_path / "flat_0000.mha"])
    np.testing.assert_array_equal(data, expected)
    assert data.shape == (1, 1, 9, 11) and props == expected_props
    back = label_map_image(np.ones((1, 9, 11), np.uint8), props)  # a 2D image again, on the input's grid
    assert back.GetDimension() == 2 and _geometry(back) == _geometry(flat)

    # a numpy array with origin and direction: the same properties as the file gives
    props = array_properties(spacing=(2.5, 0.8, 0.7), origin=ORIGIN, direction=DIRECTION)
    assert props["spacing"] == props_3d["spacing"] and props["geometry"]["ndim"] == 3
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(props["geometry"][key], props_3d["geometry"][key], atol=1e-6)


def test_bad_images_are_one_clear_error(model):
    md, image_file = model
    predictor = Predictor.from_model_dir(md, device="cpu", tta=False, progress=False)
    image = sitk.ReadImage(str(image_file))
    array = sitk.GetArrayFromImage(image)
    array[2, 3, 4] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    with pytest.raises(InputError, match="1 NaN/Inf voxel"):
        predict_sitk(predictor, broken)
    shifted = sitk.Image(image)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="channel 1: size/spacing/origin/direction differ"):
        image_case([image, shifted])
    with pytest.raises(SamplanError, match="image has 2 channel"):
        predict_sitk(predictor, [image, image])
    size = f"{image.GetSize()[0]}x{image.GetSize()[1]}"
    with pytest.raises(InputError, match=f"2D image of {size} pixels, but this model was trained on 3D"):
        predict_sitk(predictor, image[:, :, 0])
    with pytest.raises(InputError, match="vector/RGB"):
        predict_sitk(predictor, sitk.Compose(image, image))
    with pytest.raises(InputError, match="determinant is 0"):
        array_properties((1, 1, 1), direction=(1, 0, 0, 0, 1, 0, 0, 0, 0))
    with pytest.raises(InputError, match="spacing must be 3 positive values"):
        array_properties((1, 1))
