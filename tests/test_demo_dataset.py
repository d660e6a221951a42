"""The generated demo dataset: valid nnU-Net raw format, deterministic, anisotropic, both labels, real contrast."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from samplan.cli.make_demo_dataset import main as demo_main
from samplan.dataset.dataset_json import label_values, list_training_cases, load_dataset_json, num_channels
from samplan.dataset.demo import DEMO_NAME, write_demo_dataset
from samplan.dataset.image_io import read_images, read_seg


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The default demo set (12 cases, seed 0), written once for the module."""
    return write_demo_dataset(tmp_path_factory.mktemp("raw"), n_cases=12, seed=0)


@pytest.fixture(scope="module")
def cases(demo):
    """{case: (image (1, Z, Y, X) float32, labels (1, Z, Y, X), image properties, label properties)}."""
    dj = load_dataset_json(demo)
    out = {}
    for case, files in list_training_cases(demo, dj).items():
        img, props = read_images(files["images"])
        seg, seg_props = read_seg(files["label"])
        out[case] = (img, seg, props, seg_props)
    return out


def _file_bytes(ds: Path) -> dict[str, bytes]:
    return {str(p.relative_to(ds)): p.read_bytes() for p in sorted(ds.rglob("*")) if p.is_file()}


def test_dataset_json_and_files_are_consistent(demo, cases):
    dj = load_dataset_json(demo)
    assert demo.name == DEMO_NAME
    assert dj["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert dj["numTraining"] == 12 == len(cases)
    assert num_channels(dj) == 1 and dj["file_ending"] == ".nii.gz"
    assert "CC0" in dj["licence"] and dj["description"]
    # nothing but the declared cases on disk, no leftover temporary files
    assert len(list((demo / "imagesTr").iterdir())) == 12 and len(list((demo / "labelsTr").iterdir())) == 12
    declared = set(label_values(dj))
    for case, (img, seg, props, seg_props) in cases.items():
        assert img.shape[0] == 1, case
        assert img.shape[1:] == seg.shape[1:], case
        assert np.allclose(props["spacing"], seg_props["spacing"]), case
        assert set(np.unique(seg).tolist()) <= declared, case


def test_samplan_verification_accepts_it(demo):
    from samplan.dataset.verify import verify_dataset

    verify_dataset(demo, num_processes=1)  # raises on any problem


def test_anisotropic_and_varying_geometry(cases):
    spacings = np.array([c[2]["spacing"] for c in cases.values()])
    shapes = np.array([c[0].shape[1:] for c in cases.values()])
    # the coarse axis is the first one and more than 3x the in-plane spacing (nnU-Net's anisotropy threshold)
    assert np.all(spacings[:, 0] / spacings[:, 1:].max(1) > 3)
    assert np.allclose(spacings[:, 1], spacings[:, 2])
    assert np.all((shapes[:, 0] >= 20) & (shapes[:, 0] <= 30)) and np.all((shapes[:, 1:] >= 80) & (shapes[:, 1:] <= 110))
    assert len({tuple(s) for s in shapes}) > 6, "cases should differ in size"
    assert np.ptp(spacings[:, 0]) > 0.1, "slice thickness should vary a little between cases"


def test_both_labels_in_every_case_with_lesion_smaller_and_varying(cases):
    organ_sizes, lesion_centres = [], []
    for case, (_, seg, _, _) in cases.items():
        n_organ, n_lesion = int((seg == 1).sum()), int((seg == 2).sum())
        assert n_organ > 0 and n_lesion > 0, case
        assert n_lesion < n_organ, case
        # the lesion touches the organ (inside it or on its edge), it is not a separate far-away blob
        assert (ndimage.binary_dilation(seg[0] == 2, iterations=2) & (seg[0] == 1)).any(), case
        organ_sizes.append(n_organ)
        lesion_centres.append(np.argwhere(seg[0] == 2).mean(0) / seg.shape[1:])
    assert np.std(organ_sizes) / np.mean(organ_sizes) > 0.1, "organ size should vary between cases"
    assert np.std(np.array(lesion_centres), axis=0).max() > 0.03, "lesion position should vary between cases"


def test_intensity_contrast_between_structures(cases):
    for case, (img, seg, _, _) in cases.items():
        im, lab = img[0], seg[0]
        organ = ndimage.binary_erosion(lab == 1, iterations=1)
        lesion = ndimage.binary_erosion(lab == 2, iterations=1) if (lab == 2).sum() > 100 else lab == 2
        body = im > 0
        # tissue just around the organ, outside both structures and inside the body
        shell = ndimage.binary_dilation(lab > 0, iterations=4) & ~ndimage.binary_dilation(lab > 0, iterations=1) & body
        noise = im[organ].std()
        assert abs(np.median(im[organ]) - np.median(im[lesion])) > 2 * noise, case
        assert abs(np.median(im[organ]) - np.median(im[shell])) > noise, case
        # MR-like: non-negative, exactly zero outside the body, every foreground voxel inside it
        assert im.min() >= 0 and np.all(body[lab > 0]), case
        assert 0.2 < (im == 0).mean() < 0.8, case


def test_deterministic_idempotent_and_seed_dependent(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_cases=3, seed=5)
    b = write_demo_dataset(tmp_path / "b", n_cases=3, seed=5)
    assert _file_bytes(a) == _file_bytes(b)
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    write_demo_dataset(tmp_path / "a", n_cases=3, seed=5)  # re-run: files untouched
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == mtimes
    assert not [p for p in a.rglob("*") if p.name.startswith(".")], "temporary files left behind"
    c = write_demo_dataset(tmp_path / "c", n_cases=3, seed=6)
    assert _file_bytes(c)["imagesTr/demo_000_0000.nii.gz"] != _file_bytes(a)["imagesTr/demo_000_0000.nii.gz"]
    # case i does not depend on how many cases are written; shrinking removes the surplus cases
    d = write_demo_dataset(tmp_path / "d", n_cases=2, seed=5)
    assert _file_bytes(d)["labelsTr/demo_001.nii.gz"] == _file_bytes(a)["labelsTr/demo_001.nii.gz"]
    write_demo_dataset(tmp_path / "a", n_cases=2, seed=5)
    assert sorted(p.name for p in (a / "labelsTr").iterdir()) == ["demo_000.nii.gz", "demo_001.nii.gz"]
    assert json.loads((a / "dataset.json").read_text())["numTraining"] == 2


def test_cli_defaults_to_samplan_raw_and_refuses_foreign_folder(samplan_env, tmp_path, capsys):
    assert demo_main(["--cases", "2", "--seed", "1"]) == 0
    assert (samplan_env["SAMPLAN_RAW"] / DEMO_NAME / "labelsTr" / "demo_001.nii.gz").is_file()
    foreign = tmp_path / "other" / DEMO_NAME
    foreign.mkdir(parents=True)
    (foreign / "dataset.json").write_text(json.dumps({"name": "someone else's data"}))
    assert demo_main(["-o", str(tmp_path / "other"), "--cases", "2"]) != 0
    assert "not written by samplan_make_demo_dataset" in capsys.readouterr().err
    assert not (foreign / "imagesTr").exists()
    assert demo_main(["--cases", "0"]) != 0


def test_held_out_cases_differ_from_training_cases(tmp_path):
    """--test-cases writes imagesTs/labelsTs with new cases; the training cases stay unchanged."""
    from samplan.dataset.demo import write_demo_dataset

    ds = write_demo_dataset(tmp_path, n_cases=2, seed=0, n_test_cases=2)
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == ["demo_002_0000.nii.gz", "demo_003_0000.nii.gz"]
    assert sorted(p.name for p in (ds / "labelsTs").iterdir()) == ["demo_002.nii.gz", "demo_003.nii.gz"]
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == ["demo_000.nii.gz", "demo_001.nii.gz"]
    tr = (ds / "imagesTr" / "demo_001_0000.nii.gz").read_bytes()
    ts = (ds / "imagesTs" / "demo_002_0000.nii.gz").read_bytes()
    assert tr != ts
