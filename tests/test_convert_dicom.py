"""samplan_convert_dicom: synthetic DICOM series written with SimpleITK come back as the source volume and geometry."""
from __future__ import annotations

import locale
import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samplan.cli import convert_dicom as cli
from samplan.dataset.converters.dicom import convert_dicom
from samplan.errors import DatasetError, InputError

_UID_ROOT = "1.2.826.0.1.3680043.2.1125.9"


def _rotation(a: float, b: float) -> np.ndarray:
    """A proper rotation (det +1) about x by `a` then z by `b`: DICOM stores the third direction axis as a cross product."""
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def make_volume(seed: int, shape=(7, 20, 16), spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, 33.0),
                direction: np.ndarray | None = None) -> sitk.Image:
    """A CT-like int16 volume (numpy (Z, Y, X) `shape`) with the given geometry."""
    arr = np.random.default_rng(seed).integers(-1000, 2000, shape).astype(np.int16)
    vol = sitk.GetImageFromArray(arr)
    vol.SetSpacing(spacing)
    vol.SetOrigin(origin)
    vol.SetDirection((direction if direction is not None else _rotation(0.5, 0.3)).flatten().tolist())
    return vol


@pytest.fixture(autouse=True)
def _keep_locale():
    """GDCM's DICOM writer sets the C locale (so Python's default text encoding becomes ASCII for the rest of the
    process); the tests write DICOM, samplan only reads it: put the locale back after each test."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def write_series(vol: sitk.Image, folder: Path, series: int, seed: int, skip: tuple[int, ...] = (),
                 tilt_mm: float = 0.0) -> None:
    """Write `vol` as one DICOM file per slice with shuffled file names (file order is not slice order); `tilt_mm`
    shifts each slice that far along its rows, as a tilted CT gantry does."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayViewFromImage(vol)
    d = np.array(vol.GetDirection()).reshape(3, 3)
    n = arr.shape[0]
    names = [f"IM{k:05d}" for k in random.Random(seed).sample(range(10000), n)]
    assert names != sorted(names)  # file order is not slice order
    for z in range(n):
        if z in skip:
            continue
        sl = sitk.GetImageFromArray(np.ascontiguousarray(arr[z]))
        sl.SetSpacing(vol.GetSpacing()[:2])
        tags = {
            "0008|0060": "CT", "0008|0018": f"{_UID_ROOT}.{seed}.{series}.{z}", "0020|000d": f"{_UID_ROOT}.{seed}",
            "0020|000e": f"{_UID_ROOT}.{seed}.{series}", "0020|0011": str(series), "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in np.array(vol.TransformIndexToPhysicalPoint((0, 0, z))) + z * tilt_mm * d[:, 0]),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])),
            "0018|0050": str(vol.GetSpacing()[2]),
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / names[z]))
        writer.Execute(sl)


def _assert_same(out_file: Path, vol: sitk.Image) -> None:
    out = sitk.ReadImage(str(out_file))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(vol))
    np.testing.assert_allclose(out.GetSpacing(), vol.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(out.GetOrigin(), vol.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), vol.GetDirection(), atol=1e-5)


def test_series_come_back_with_their_voxels_and_geometry(tmp_path, capsys):
    src = tmp_path / "dicom"
    vols = {
        "patientA_CT_1": make_volume(1),
        "patientA_CT_2": make_volume(2, shape=(5, 12, 10), spacing=(1.0, 1.0, 3.0), origin=(4.0, -2.0, 1.5)),
        "patientB_CT": make_volume(3, direction=np.eye(3)),
        "MR": make_volume(4, shape=(4, 10, 10), direction=_rotation(-0.2, 1.1)),
    }
    # two series in one folder: SeriesNumber 2 before 7, whatever their UIDs or files
    write_series(vols["patientA_CT_2"], src / "patientA" / "CT", series=7, seed=11)
    write_series(vols["patientA_CT_1"], src / "patientA" / "CT", series=2, seed=12)
    write_series(vols["patientB_CT"], src / "patientB" / "CT", series=1, seed=13)
    write_series(vols["MR"], src / "MR", series=1, seed=14)
    (src / "patientB" / "notes.txt").write_text("not DICOM")
    out = tmp_path / "imagesTs"
    assert cli.main(["-i", str(src), "-o", str(out), "-np", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}_0000.nii.gz" for c in vols)
    for case, vol in vols.items():
        _assert_same(out / f"{case}_0000.nii.gz", vol)
    printed = capsys.readouterr().out
    assert "patientA_CT_1_0000.nii.gz  <- patientA/CT  (7 file(s), 16x20x7 voxels, 0.7x0.8x2.5 mm)" in printed

    # an existing output is kept unless --overwrite
    assert cli.main(["-i", str(src / "MR"), "-o", str(out), "-np", "1"]) == 2
    assert "exists already" in capsys.readouterr().err and len(list(out.iterdir())) == 4
    assert cli.main(["-i", str(src / "MR"), "-o", str(out), "-np", "1", "--overwrite"]) == 0
    assert [p.name for p in out.iterdir()] == ["MR_0000.nii.gz"]  # a series directly in -i is named after -i


def test_missing_slice_is_refused_and_nothing_written(tmp_path):
    src = tmp_path / "dicom"
    write_series(make_volume(5), src / "good", series=1, seed=21)
    write_series(make_volume(6), src / "gappy", series=1, seed=22, skip=(3,))
    out = tmp_path / "out" / "images"
    with pytest.raises(DatasetError, match=r"gappy: the slice gaps are uneven \(from 2\.5 to 5 mm"):
        convert_dicom(src, out, num_processes=1)
    assert not out.exists() and list(out.parent.iterdir()) == []

    write_series(make_volume(9, shape=(4, 8, 8)), src / "tilted", series=1, seed=24, tilt_mm=0.5)
    with pytest.raises(DatasetError, match="tilted: consecutive slices are shifted sideways by up to 0.5 mm"):
        convert_dicom(src / "tilted", out, num_processes=1)

    # two time points of one volume in one series: two slices share each position
    vol = make_volume(7, shape=(3, 8, 8))
    write_series(vol, src / "dup", series=1, seed=23)
    for f in (src / "dup").iterdir():
        f.rename(f.with_name(f.name + "a"))
    write_series(vol, src / "dup2", series=1, seed=23)
    for f in (src / "dup2").iterdir():
        f.rename(src / "dup" / f.name)
    with pytest.raises(DatasetError, match="dup: several slices of one series lie at the same position"):
        convert_dicom(src / "dup", out, num_processes=1)
    assert not out.exists()


def test_no_dicom_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM series found"):
        convert_dicom(tmp_path / "empty", tmp_path / "out", num_processes=1)
    write_series(make_volume(8, shape=(2, 6, 6)), tmp_path / "study" / "CT", series=1, seed=30)
    with pytest.raises(InputError, match="is, or contains, the input"):  # --overwrite would delete the input
        convert_dicom(tmp_path / "study" / "CT", tmp_path / "study", num_processes=1, overwrite=True)
    assert len(list((tmp_path / "study" / "CT").iterdir())) == 2
