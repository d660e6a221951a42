"""integrity.file_problems: damage that SimpleITK/PIL read silently is found, in every format, on real data."""
from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_dataset
from damage import DAMAGES, DETECTABLE, FORMATS, make_clean
from samplan.dataset.image_io import read_images
from samplan.dataset.integrity import file_problems
from samplan.errors import DatasetError

CASES = [(d, f) for d in DAMAGES for f in FORMATS if f in DETECTABLE[d]]


@pytest.fixture(autouse=True)
def _shared_data():
    shared_dataset("Dataset004_Hippocampus")
    shared_dataset("Dataset511_CVCClinicDB")


@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_file_passes_and_reads(tmp_path, fmt):
    clean = make_clean(fmt, tmp_path)
    assert file_problems(clean) == []
    arr, _ = read_images([clean])
    assert arr.size > 1000 and np.isfinite(arr).all()


@pytest.mark.parametrize(("damage", "fmt"), CASES, ids=[f"{d}-{f}" for d, f in CASES])
def test_damage_is_reported_and_refused(tmp_path, damage, fmt):
    clean = make_clean(fmt, tmp_path)
    bad = tmp_path / f"damaged{clean.name[len('img_0000'):]}"
    DAMAGES[damage](clean, bad)
    problems = file_problems(bad)
    assert problems, f"{damage} in a {fmt} file went unnoticed"
    assert all(p.startswith(f"{bad}: ") and len(p) > len(str(bad)) + 30 for p in problems)
    # prediction reads do not run verify: the reader itself must refuse the file, naming it
    with pytest.raises(DatasetError, match=bad.name.replace(".", r"\.")):
        read_images([bad])


def test_simpleitk_reads_the_truncated_file_that_is_reported(tmp_path):
    # the reason for this module: ITK returns a full-size volume from half a .nii.gz
    clean = make_clean("nii.gz", tmp_path)
    bad = tmp_path / "half.nii.gz"
    DAMAGES["truncate_middle"](clean, bad)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(bad))).shape == sitk.GetArrayFromImage(sitk.ReadImage(str(clean))).shape
    assert "truncated" in file_problems(bad)[0]


def test_multi_member_and_zero_padded_gzip_pass(tmp_path):
    # bgzip/pigz write several gzip members, some tools pad with zeros: both are intact files
    plain = gzip.decompress(make_clean("nii.gz", tmp_path).read_bytes())
    f = tmp_path / "members.nii.gz"
    f.write_bytes(gzip.compress(plain[:5000]) + gzip.compress(plain[5000:]) + b"\0" * 16)
    assert file_problems(f) == []
    f.write_bytes(gzip.compress(plain) + b"garbage!")
    assert "garbage after the end of its gzip stream" in file_problems(f)[0]


def test_nibabel_default_nan_slope_is_not_damage(tmp_path):
    # nibabel writes scl_slope = NaN ("no scaling") into every unscaled file
    f = tmp_path / "nib.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4)), f)
    assert np.isnan(nib.load(f).header["scl_slope"])
    assert file_problems(f) == []


def test_messages_name_the_damage(tmp_path):
    clean = make_clean("nii", tmp_path)
    cases = {"truncate_middle": "truncated", "header_fewer_voxels": "more voxel data than", "scaling_overflows": "infinity",
             "scaling_bad_intercept": "scl_inter", "nan_inf_values": "5 NaN/Inf voxel(s)"}
    for damage, needle in cases.items():
        bad = tmp_path / f"{damage}.nii"
        DAMAGES[damage](clean, bad)
        assert needle in " ".join(file_problems(bad)), damage
    png = make_clean("png", tmp_path)
    DAMAGES["flip_middle_byte"](png, tmp_path / "flipped.png")
    assert "CRC" in file_problems(tmp_path / "flipped.png")[0]


def test_header_announcing_huge_volume_is_not_decompressed(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000))
    hdr.set_data_dtype(np.float64)
    f = tmp_path / "bomb.nii.gz"
    f.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 100_000))
    (problem,) = file_problems(f)
    assert "476.8 GiB" in problem and "SAMPLAN_MAX_IMAGE_BYTES" in problem


def test_png_bomb_refused_at_its_header(tmp_path):
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # 60000 x 60000 grey pixels announced; the few KiB of zlib data would inflate to 3.6 GB if continued
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    f = tmp_path / "bomb.png"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 600_010)) + chunk(b"IEND", b""))
    (problem,) = file_problems(f)
    assert "3600000000 pixels" in problem and "SAMPLAN_MAX_IMAGE_PIXELS" in problem
    with pytest.raises(DatasetError, match="bomb.png.*limit"):
        read_images([f])
