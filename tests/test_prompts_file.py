"""Prompts files: schema validation (every problem at once), world -> voxel on oblique grids, bounds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from samplan.dataset.image_io import read_images
from samplan.errors import DatasetError
from samplan.prompts.prompts_file import (ImageGrid, PromptsFileError, load_prompts, read_prompts_file,
                                          world_to_voxel)

SIZE = (20, 16, 10)  # SimpleITK (x, y, z); the array is (10, 16, 20)


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    """A proper rotation (oblique direction matrix) from three angles in radians."""
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique_image() -> sitk.Image:
    img = sitk.Image(list(SIZE), sitk.sitkInt16)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((-30.0, 12.5, 100.0))
    img.SetDirection(_rotation(0.3, -0.5, 0.8).ravel().tolist())
    return img


@pytest.fixture
def oblique(tmp_path):
    """(SimpleITK image, ImageGrid built from image_io's properties of that image written to disk)."""
    img = _oblique_image()
    sitk.WriteImage(img, str(tmp_path / "img.mha"))
    arr, props = read_images([tmp_path / "img.mha"])
    return img, ImageGrid.from_properties(arr.shape, props)


def _write(tmp_path, data) -> str:
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_world_to_voxel_matches_simpleitk_on_an_oblique_anisotropic_grid():
    img = _oblique_image()
    rng = np.random.default_rng(0)
    pts = rng.uniform(-60, 140, size=(25, 3))
    expected = np.array([img.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in pts])
    got = world_to_voxel(pts, img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    np.testing.assert_allclose(got, expected, atol=1e-9)
    img2 = sitk.Image([12, 9], sitk.sitkUInt8)
    img2.SetSpacing((0.4, 1.3))
    img2.SetOrigin((5.0, -2.0))
    img2.SetDirection([np.cos(0.6), -np.sin(0.6), np.sin(0.6), np.cos(0.6)])
    pts2 = rng.uniform(-10, 10, size=(10, 2))
    expected2 = np.array([img2.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in pts2])
    np.testing.assert_allclose(world_to_voxel(pts2, img2.GetSpacing(), img2.GetOrigin(), img2.GetDirection()),
                               expected2, atol=1e-9)


def test_valid_file_in_voxel_and_world_coordinates(tmp_path, oblique):
    img, grid = oblique
    assert grid.shape == (10, 16, 20)
    world = lambda x, y, z: list(img.TransformContinuousIndexToPhysicalPoint((x, y, z)))  # noqa: E731
    path = _write(tmp_path, {"version": 1, "cases": {"c1": [
        {"label": 2, "slice": 7, "points": [[3, 4], [10.5, 12]], "point_labels": [1, 0], "box": [2, 3, 15, 14]},
        {"label": 1, "slice": 2, "points": [[19.4, 0]]},  # half-pixel margin: clipped to 19
        {"label": 1, "coordinates": "world", "points": [world(5.25, 6.5, 4.2)]},  # projected onto slice 4
        {"label": 3, "coordinates": "world", "box": [world(10, 12, 6), world(3, 4, 6)]},
    ]}})
    out = load_prompts(path, {"c1": grid, "unused": grid})
    assert set(out) == {"c1"}
    p = out["c1"]
    assert [(q.slice, q.label, q.entry) for q in p] == [(2, 1, 1), (4, 1, 2), (6, 3, 3), (7, 2, 0)]
    np.testing.assert_allclose(p[0].points, [[19.0, 0.0]])
    assert p[0].point_labels.tolist() == [1] and p[0].box is None  # labels default to positive
    np.testing.assert_allclose(p[1].points, [[5.25, 6.5]], atol=1e-6)
    assert p[2].points.shape == (0, 2)
    np.testing.assert_allclose(p[2].box, [3, 4, 10, 12], atol=1e-6)  # min/max of the mapped corners
    assert p[3].points.dtype == np.float64 and p[3].points.tolist() == [[3, 4], [10.5, 12]]
    assert p[3].point_labels.tolist() == [1, 0] and p[3].box.tolist() == [2, 3, 15, 14]


def test_file_level_world_default_and_2d_images(tmp_path):
    grid = ImageGrid.from_properties((1, 1, 8, 6), {"geometry": {"kind": "natural", "shape": [8, 6]}})
    path = _write(tmp_path, {"coordinates": "world", "cases": {"x": [
        {"label": 1, "points": [[2.0, 7.0]]},
        {"label": 1, "coordinates": "voxel", "box": [0, 0, 5, 7]},
    ]}})
    out = load_prompts(path, {"x": grid})["x"]
    assert [q.slice for q in out] == [0, 0]
    assert out[0].points.tolist() == [[2.0, 7.0]] and out[1].box.tolist() == [0, 0, 5, 7]


def test_every_schema_problem_is_reported_at_once_with_case_and_entry(tmp_path):
    path = _write(tmp_path, {"version": 1, "colour": "red", "coordinates": "voxel", "cases": {
        "a": [
            {"slice": 0, "points": [[1, 2]]},                                  # 0: no label
            {"label": 0, "slice": 0, "points": [[1, 2]]},                      # 1: label not positive
            {"label": 1, "slice": 0},                                          # 2: neither points nor box
            {"label": 1, "slice": -1, "points": [[1, 2]]},                     # 3: bad slice
            {"label": 1, "slice": 0, "points": [[1, 2, 3]]},                   # 4: voxel point with 3 numbers
            {"label": 1, "slice": 0, "points": [[1, 2]], "point_labels": [1, 0]},  # 5: count mismatch
            {"label": 1, "slice": 0, "points": [[1, 2]], "point_labels": [2]},  # 6: label not 0/1
            {"label": 1, "slice": 0, "box": [5, 1, 2, 4]},                     # 7: x0 > x1
            {"label": 1, "slice": 0, "box": [1, 2, 3]},                        # 8: 3 numbers
            {"label": 1, "coordinates": "world", "slice": 3, "points": [[1, 2, 3]]},  # 9: slice with world
            {"label": 1, "coordinates": "pixels", "points": [[1, 2]]},         # 10: bad coordinates
            {"label": 1, "slice": 0, "points": [[1, 2]], "pts": 1},            # 11: unknown key
            "not an entry",                                                    # 12
            {"label": 1, "coordinates": "world", "box": [[0, 0, 0]]},          # 13: one corner
        ],
        "b": {"label": 1},
    }})
    with pytest.raises(PromptsFileError) as exc:
        read_prompts_file(path)
    problems = exc.value.problems
    assert isinstance(exc.value, DatasetError) and exc.value.exit_code == 2
    assert len(problems) == 16, "\n".join(problems)
    assert all(path in p for p in problems)
    for i in range(14):
        assert any(f"cases['a'][{i}]" in p for p in problems), i
    assert any("cases['b']" in p for p in problems)
    assert any("'colour'" in p for p in problems)
    assert str(problems[0]) in str(exc.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(PromptsFileError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{cases: ")
    with pytest.raises(PromptsFileError, match="not valid JSON"):
        read_prompts_file(bad)
    with pytest.raises(PromptsFileError, match="'cases' must be an object"):
        read_prompts_file(_write(tmp_path, {"version": 1}))


def test_out_of_image_and_slice_problems_name_case_and_entry(tmp_path, oblique):
    img, grid = oblique
    world = lambda x, y, z: list(img.TransformContinuousIndexToPhysicalPoint((x, y, z)))  # noqa: E731
    path = _write(tmp_path, {"cases": {
        "c1": [
            {"label": 1, "slice": 0, "points": [[20, 3]]},                    # 0: x beyond the last column 19
            {"label": 1, "slice": 0, "box": [0, 0, 5, 16.2]},                 # 1: y1 beyond row 15
            {"label": 1, "slice": 10, "points": [[1, 1]]},                    # 2: slice 10 of 0..9
            {"label": 1, "points": [[1, 1]]},                                 # 3: 3D image needs a slice
            {"label": 1, "coordinates": "world", "points": [world(3, 3, 11)]},  # 4: z off the image
            {"label": 1, "coordinates": "world", "points": [world(3, 3, 2), world(4, 4, 5)]},  # 5: two slices
            {"label": 1, "coordinates": "world", "points": [world(3, 3, 2)[:2]]},  # 6: 2D point, 3D image
            {"label": 1, "coordinates": "world", "points": [world(-2, 3, 2)]},  # 7: x off the image
            {"label": 1, "slice": 0, "points": [[19.5, 15.5]]},                # fine: half-pixel margin
        ],
        "nope": [{"label": 1, "slice": 0, "points": [[1, 1]]}],
    }})
    with pytest.raises(PromptsFileError) as exc:
        load_prompts(path, {"c1": grid})
    problems = exc.value.problems
    assert len(problems) == 9, "\n".join(problems)
    for i in range(8):
        assert sum(f"cases['c1'][{i}]" in p for p in problems) == 1, i
    assert any("cases['nope']" in p and "no such case" in p for p in problems)
    assert "cases['c1'][8]" not in str(exc.value)
