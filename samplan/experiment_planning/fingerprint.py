"""Dataset fingerprint: nnU-Net v2.8.1's keys computed by nnU-Net's rules, plus label statistics for SAM methods.

The nnU-Net rules reproduced here (so that the two fingerprints of one dataset can be compared):
- each case is cropped to the bounding box of its nonzero region (all channels, holes filled);
- "foreground" is every voxel of the cropped label map with a value > 0 (this includes an ignore label);
- 1e8 intensity samples are shared equally between the cases (int(1e8 // n_cases) per case), drawn with
  replacement from the case's foreground voxels of each channel in turn, by a fresh
  `np.random.RandomState(1234)` per case; a case without foreground contributes no samples;
- the samples of all cases (sorted case ids) are concatenated per channel as float32, and mean, std, min,
  max and the 0.5 / 50 / 99.5 percentiles (numpy's default linear interpolation) are taken over them.
  samplan draws the very same samples (`choice` with replacement is `randint` indices) but keeps each case's as
  distinct values with counts, and takes the statistics of the weighted values: the same order statistics and
  percentiles, mean and std in float64 (nnU-Net's float32 sums differ in the 7th digit), without ever holding
  1e8 floats (400 MB per channel, sent from the workers and partitioned in the main process);
- median_relative_size_after_cropping is the median over cases of voxels after / before cropping.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image

from samplan.dataset.dataset_json import list_training_cases, load_dataset_json, num_channels
from samplan.dataset.image_io import NATURAL_ENDINGS, read_images, read_seg
from samplan.errors import DatasetError
from samplan.experiment_planning.label_statistics import (
    LabelKeys,
    aggregate_label_stats,
    case_label_stats,
    label_keys,
    slice_axis_of,
)
from samplan.parallel import default_num_processes, map_cases
from samplan.preprocessing.cropping import crop_to_nonzero

# nnU-Net's values: total number of foreground intensity samples over the dataset, and the sampling seed
NNUNET_INTENSITY_SAMPLES = 1e8
NNUNET_INTENSITY_SEED = 1234
_PERCENTILES = (0.5, 50.0, 99.5)


def fingerprint_items(raw_dir: str | Path, total_intensity_samples: float | None = None
                      ) -> tuple[list[tuple[str, tuple]], int]:
    """The per-case work: `(case, (image files, label file, n_samples, slice_axis, keys))` items (the args of
    `_analyze_case`, and of `analyze_arrays` after the arrays) and the bytes a worker may need; reads headers only."""
    raw_dir = Path(raw_dir)
    dataset_json = load_dataset_json(raw_dir)
    ending = dataset_json["file_ending"]
    cases = list_training_cases(raw_dir, dataset_json)
    if not cases:
        raise DatasetError(f"{raw_dir / 'labelsTr'} holds no label files ending in '{ending}': nothing to fingerprint.")
    n_channels = num_channels(dataset_json)
    n_samples = int((total_intensity_samples or NNUNET_INTENSITY_SAMPLES) // len(cases))

    # headers only (cheap): the slice axis must be known before the per-case pass, and the largest case
    # bounds the memory each worker needs
    headers = {case: _header(case, files["images"]) for case, files in cases.items()}
    is_2d = any(sp is None for _, sp in headers.values())
    slice_axis = slice_axis_of([sp for _, sp in headers.values()], is_2d=is_2d)
    max_voxels = max(v for v, _ in headers.values())
    # per voxel: the file's pixels and the float32 copy per channel, the fill-holes mask, the label map, the
    # connected-component labels; plus one channel's drawn indices (int64; the samples become counts)
    bytes_per_case = max_voxels * (12 * n_channels + 16) + 8 * n_samples
    keys = label_keys(dataset_json)
    items = [(case, (files["images"], files["label"], n_samples, slice_axis, keys)) for case, files in cases.items()]
    return items, bytes_per_case


def extract_fingerprint(
    raw_dir: str | Path,
    num_processes: int | None = None,
    *,
    progress: bool = True,
    total_intensity_samples: float = NNUNET_INTENSITY_SAMPLES,
    items: list[tuple[str, tuple]] | None = None,
    analysed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fingerprint of a raw nnU-Net-format dataset as a JSON-ready dict (keys: SCHEMAS.md, fingerprint.json).

    Reads every training case once, in worker processes bounded by cores and free memory, unless `analysed`
    holds every case's `analyze_arrays` result already (verify_dataset computes them while it reads the files;
    `items` are then the `fingerprint_items` it was given).
    `total_intensity_samples` is nnU-Net's 1e8; change it only to trade exactness for memory.
    """
    raw_dir = Path(raw_dir)
    dataset_json = load_dataset_json(raw_dir)
    n_channels = num_channels(dataset_json)
    if items is None:
        items, bytes_per_case = fingerprint_items(raw_dir, total_intensity_samples)
    else:
        bytes_per_case = None
    if analysed is not None and all(case in analysed for case, _ in items):
        results = {case: analysed[case] for case, _ in items}
    else:
        nproc = default_num_processes(num_processes, bytes_per_case, len(items))
        results = map_cases(_analyze_case, items, nproc, desc="Extracting dataset fingerprint", progress=progress)
    slice_axis, keys = items[0][1][3], items[0][1][4]

    case_ids = list(results)
    for case in case_ids:
        if len(results[case]["samples"]) != n_channels:
            raise DatasetError(
                f"case '{case}' has {len(results[case]['samples'])} channel(s) but dataset.json declares "
                f"{n_channels} in channel_names; fix channel_names or the images of this case."
            )
    spacings = [results[c]["spacing"] for c in case_ids]
    fingerprint = {
        "spacings": spacings,
        "shapes_after_crop": [results[c]["shape_after_crop"] for c in case_ids],
        "foreground_intensity_properties_per_channel": _intensity_properties(
            [results[c]["samples"] for c in case_ids], raw_dir
        ),
        "median_relative_size_after_cropping": float(np.median([results[c]["relative_size"] for c in case_ids])),
        "case_identifiers": case_ids,
        "file_ending": dataset_json["file_ending"],
        "num_channels": n_channels,
        "label_statistics": aggregate_label_stats(
            [results[c]["labels"] for c in case_ids], spacings, slice_axis, keys
        ),
    }
    return fingerprint


def _analyze_case(
    image_files: Sequence[Path], label_file: Path, n_samples: int, slice_axis: int, keys: LabelKeys
) -> dict[str, Any]:
    """Worker: read one case, crop it, sample its foreground intensities and measure its labels.

    Returns only small things: spacing, shape after cropping, the relative size, a list of float32
    `(n_samples,)` intensity samples per channel (empty without foreground) and the label statistics.
    """
    data, props = read_images(image_files)
    seg, _ = read_seg(label_file)
    return analyze_arrays(data, props, seg, image_files, label_file, n_samples, slice_axis, keys)


def analyze_arrays(data: np.ndarray, props: dict[str, Any], seg: np.ndarray, image_files: Sequence[Path],
                   label_file: Path, n_samples: int, slice_axis: int, keys: LabelKeys) -> dict[str, Any]:
    """The fingerprint's per-case result from a case's float32 images `(C, Z, Y, X)`, properties and label map."""
    if seg.shape[1:] != data.shape[1:]:
        raise DatasetError(f"{label_file}: label shape {seg.shape[1:]} differs from image shape {data.shape[1:]}.")
    labels = case_label_stats(seg[0], slice_axis, keys)
    shape_before = data.shape[1:]
    data, seg, _ = crop_to_nonzero(data, seg)
    samples = _foreground_samples(data, seg, n_samples, image_files)
    return {
        "spacing": [float(s) for s in props["spacing"]],
        "shape_after_crop": [int(s) for s in data.shape[1:]],
        "relative_size": float(np.prod(data.shape[1:]) / np.prod(shape_before)),
        "samples": samples,
        "labels": labels,
    }


def _foreground_samples(
    data: np.ndarray, seg: np.ndarray, n_samples: int, image_files: Sequence[Path]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """nnU-Net's seeded sample (with replacement) of the foreground intensities of cropped `(C, Z, Y, X)` data, per
    channel as `(distinct float32 values ascending, int64 counts)`.

    One generator per case, used for the channels in order, so channel c's draw depends on the channels before it;
    `RandomState.choice(pixels, n)` with replacement draws `pixels[randint(0, len(pixels), n)]`, so counting the
    indices gives exactly its sample (tested against `choice`).
    """
    rs = np.random.RandomState(NNUNET_INTENSITY_SEED)
    foreground = seg[0] > 0
    out = []
    for c in range(data.shape[0]):
        pixels = data[c][foreground].astype(np.float32, copy=False)
        if np.isnan(pixels).any():
            raise DatasetError(f"{image_files[c]}: NaN values inside the labelled region; replace them before planning.")
        if not pixels.size:
            out.append((np.zeros(0, np.float32), np.zeros(0, np.int64)))
            continue
        drawn = np.bincount(rs.randint(0, pixels.size, size=n_samples), minlength=pixels.size)
        values, where = np.unique(pixels, return_inverse=True)
        out.append((values, np.bincount(where.ravel(), weights=drawn, minlength=values.size).astype(np.int64)))
    return out


def weighted_statistics(values: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """nnU-Net's intensity statistics of the sample holding `values[i]` `counts[i]` times (values float32): numpy's
    linear-interpolation percentiles reproduced on the cumulative counts."""
    order = np.argsort(values, kind="stable")
    values, counts = values[order], counts[order]
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    cum = np.cumsum(counts)
    n = int(cum[-1])
    v64 = values.astype(np.float64)
    mean = float(np.dot(v64, counts) / n)
    std = float(np.sqrt(np.dot((v64 - mean) ** 2, counts) / n))

    def order_statistic(k: np.ndarray) -> np.ndarray:
        return values[np.searchsorted(cum, k, side="right")]

    q = np.asarray(_PERCENTILES, dtype=np.float64) / 100
    virtual = n * q + (1 + q * (1 - 1 - 1)) - 1  # numpy's _compute_virtual_index for the linear method
    below = np.floor(virtual)
    gamma = virtual - below
    a = order_statistic(below.astype(np.int64))
    b = order_statistic(np.minimum(below.astype(np.int64) + 1, n - 1))
    diff = (b - a).astype(np.float64)  # float32 difference, as numpy's _lerp takes it
    lerp = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    p00_5, median, p99_5 = (float(x) for x in lerp)
    return {"mean": mean, "median": median, "std": std, "min": float(values[0]), "max": float(values[-1]),
            "percentile_99_5": p99_5, "percentile_00_5": p00_5}


def _intensity_properties(samples: list[list[tuple[np.ndarray, np.ndarray]]],
                          raw_dir: Path) -> dict[str, dict[str, float]]:
    """Per-channel statistics over the samples of all cases (each case's as distinct values with counts)."""
    out = {}
    for c in range(len(samples[0])):
        values = np.concatenate([s[c][0] for s in samples])
        counts = np.concatenate([s[c][1] for s in samples])
        if not counts.sum():
            raise DatasetError(
                f"{raw_dir}: no training case has a foreground label voxel inside its nonzero image region."
            )
        out[str(c)] = weighted_statistics(values, counts)
    return out


def _header(case: str, image_files: Sequence[Path]) -> tuple[int, list[float] | None]:
    """Spatial voxel count of a case's first channel file and its `(Z, Y, X)` spacing (None for 2D images).

    Reads the file header only; the spacing rule (reverse, abs) is the one of image_io.read_images.
    """
    if not image_files:
        raise DatasetError(f"case '{case}' has a label file but no image files {case}_XXXX in imagesTr.")
    path = Path(image_files[0])
    try:
        if path.name.lower().endswith(NATURAL_ENDINGS):
            with Image.open(path) as im:
                w, h = im.size
                return w * h, None
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except (OSError, RuntimeError) as e:
        raise DatasetError(f"{path}: cannot read the image header ({str(e).strip().splitlines()[-1]}).") from e
    voxels = int(np.prod(reader.GetSize()))
    if reader.GetDimension() != 3:
        return voxels, None
    return voxels, [abs(float(s)) for s in reader.GetSpacing()[::-1]]
