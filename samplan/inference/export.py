"""Export: the exact inverse of preprocessing, from logits on the plan's grid to a label map in the input's geometry.

Preprocessing did transpose -> crop -> normalise -> resample (samplan.preprocessing.preprocessor); export
undoes it in reverse order: resample the logits back to the cropped grid (with the plan's
resampling_fn_probabilities_kwargs), turn them into a label map (argmax, or regions painted in
`regions_class_order`) while the array is still small, put it into a zero volume of the pre-crop shape,
and transpose back to the reader's axis order. The writer is the one that read the input.

Memory: K classes at full resolution in float32 is what makes a naive export large (14 CT classes on a
512x512x600 grid: 8.8 GB). The label map is therefore built one class at a time (resample a class, keep
a running maximum and its index, or paint a region), which gives the same labels as an argmax over all
K. Probabilities need every class at a voxel: a first pass over the classes keeps the running maximum and the
sum of exponentials (softmax's normaliser), a second pass resamples each class again and writes its probability
to the .npz, so no more than a few single-class arrays exist at once, whatever K is.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from samplan.dataset.image_io import SUPPORTED_ENDINGS, write_seg
from samplan.dataset.labels import LabelManager
from samplan.preprocessing.preprocessor import configuration_plan, target_spacing
from samplan.preprocessing.resampling import resample_channels
from samplan.utils import atomic_path, save_json

_RESAMPLING_KEYS = ("order", "order_z", "force_separate_z")


def _cropped_grid(properties: dict[str, Any], plans: dict[str, Any], configuration: str) -> dict[str, Any]:
    """The resample_channels arguments that take logits from the plan's grid back to the cropped grid
    (`new_shape` is the cropped grid's shape)."""
    plan = configuration_plan(plans, configuration)
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    original_spacing = [float(properties["spacing"][a]) for a in forward]
    # the grid preprocessing resampled to: the same function computes it, so the two can never disagree
    plan_spacing = target_spacing(plan, original_spacing)
    shape = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    kwargs = {k: v for k, v in (plan.get("resampling_fn_probabilities_kwargs") or {}).items() if k in _RESAMPLING_KEYS}
    return {"new_shape": shape, "current_spacing": plan_spacing, "new_spacing": original_spacing, **kwargs}


def resampled_logits(
    logits: torch.Tensor | np.ndarray, properties: dict[str, Any], plans: dict[str, Any], configuration: str
) -> Iterator[np.ndarray]:
    """Logits `(K, z, y, x)` on the plan's grid -> K float32 arrays `shape_after_cropping_and_before_resampling`, one at a time."""
    return resample_channels(logits, **_cropped_grid(properties, plans, configuration))


def _crop_box(properties: dict[str, Any]) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"])


def _backward(plans: dict[str, Any]) -> list[int]:
    return [int(a) for a in plans.get("transpose_backward", [0, 1, 2])]


def _uncrop_and_untranspose(
    cropped: np.ndarray, properties: dict[str, Any], plans: dict[str, Any], fill: np.ndarray | float = 0
) -> np.ndarray:
    """`(..., *cropped)` -> `(..., *original shape)` in the reader's axis order; `fill` outside the crop box."""
    lead = cropped.shape[: cropped.ndim - 3]
    full = np.empty((*lead, *properties["shape_before_cropping"]), dtype=cropped.dtype)
    full[...] = np.reshape(fill, (*np.shape(fill), 1, 1, 1)) if np.ndim(fill) else fill
    full[(Ellipsis, *_crop_box(properties))] = cropped
    return full.transpose([*range(len(lead)), *(a + len(lead) for a in _backward(plans))])


def _running_label_map(channels: Iterable[np.ndarray], label_manager: LabelManager) -> np.ndarray:
    """int16 label map from resampled logits seen one class at a time; equal to LabelManager's over all K at once.

    Softmax keeps the order of the logits, so the label is torch's argmax of the logits: the first
    maximum wins, and a NaN counts as larger than any number. Regions are painted in
    `regions_class_order` where their sigmoid exceeds 0.5, exactly as LabelManager does.
    """
    seg = best = winner = None
    if label_manager.has_regions:
        for value, channel in zip(label_manager.regions_class_order, channels):
            if seg is None:
                seg = np.zeros(channel.shape, dtype=np.int16)
            seg[torch.sigmoid(torch.as_tensor(channel).float()).numpy() > 0.5] = value
        return seg
    for k, channel in enumerate(channels):
        if best is None:
            # a copy (the channel may be a view of the caller's logits), in the logits' dtype: comparing float16
            # values in float16 gives the same answers as in float32, without a float32 copy of the volume
            best = np.array(channel)
            winner = np.zeros(channel.shape, dtype=np.uint8 if label_manager.num_outputs <= 256 else np.int16)
            continue
        better = channel > best
        better |= np.isnan(channel) & ~np.isnan(best)
        winner[better] = k
        np.copyto(best, channel, where=better)
    return np.asarray(label_manager.label_values, dtype=np.int16)[winner]


def _softmax_normaliser(channels: Iterable[np.ndarray], label_manager: LabelManager) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label map, running maximum m and sum of exp(logit - m) from logits seen one class at a time.

    The probability of class k is then exp(logit_k - m) / sum: softmax without ever holding all K classes.
    The label map is _running_label_map's (the first maximum wins).
    """
    maximum = total = winner = None
    for k, channel in enumerate(channels):
        channel = np.asarray(channel, dtype=np.float32)
        if maximum is None:
            maximum = channel.copy()  # a copy: the channel may be a view of the caller's logits
            total = np.ones_like(maximum)
            winner = np.zeros(channel.shape, dtype=np.uint8 if label_manager.num_outputs <= 256 else np.int16)
            continue
        better = channel > maximum
        better |= np.isnan(channel) & ~np.isnan(maximum)
        winner[better] = k
        new_max = np.maximum(maximum, channel)
        total *= np.exp(maximum - new_max)
        maximum = new_max
        total += np.exp(channel - maximum)
    return np.asarray(label_manager.label_values, dtype=np.int16)[winner], maximum, total


def _probability_classes(
    logits: torch.Tensor | np.ndarray, properties: dict[str, Any], plans: dict[str, Any], configuration: str,
    label_manager: LabelManager, normaliser: tuple[np.ndarray, np.ndarray] | None,
) -> Iterator[np.ndarray]:
    """float16 probabilities on the cropped grid, one class at a time (a second pass over the resampled logits)."""
    for channel in resampled_logits(logits, properties, plans, configuration):
        if normaliser is None:  # regions: sigmoid per channel
            p = torch.sigmoid(torch.as_tensor(channel).float()).numpy()
        else:
            maximum, total = normaliser
            p = np.exp(channel - maximum)
            p /= total
        yield p.astype(np.float16)


def _compact(seg: np.ndarray) -> np.ndarray:
    """uint8 when the label values fit, else int16."""
    fits_uint8 = seg.min(initial=0) >= 0 and seg.max(initial=0) < 256
    return seg.astype(np.uint8 if fits_uint8 else np.int16, copy=False)


def _class_in_input_grid(probability: np.ndarray, k: int, properties: dict[str, Any], plans: dict[str, Any],
                         label_manager: LabelManager) -> np.ndarray:
    """float16 probabilities of class `k` (cropped grid) in the input grid (a transposed view); outside the crop
    box background is certain for softmax outputs (the image is empty there) and every region 0."""
    fill = 1 if k == 0 and not label_manager.has_regions else 0
    return _uncrop_and_untranspose(probability.astype(np.float16, copy=False), properties, plans, fill)


def _label_map_in_input_grid(
    logits: torch.Tensor | np.ndarray, properties: dict[str, Any], plans: dict[str, Any], configuration: str,
    label_manager: LabelManager, with_probabilities: bool,
) -> tuple[np.ndarray, Iterator[np.ndarray] | None]:
    """Label map in the input grid, and (if asked) an iterator over the float16 probabilities of each class on the
    cropped grid, which resamples the logits a second time instead of keeping all K classes."""
    channels = resampled_logits(logits, properties, plans, configuration)
    probabilities = None
    if with_probabilities and not label_manager.has_regions:
        seg, maximum, total = _softmax_normaliser(channels, label_manager)
        probabilities = _probability_classes(logits, properties, plans, configuration, label_manager, (maximum, total))
    else:
        seg = _running_label_map(channels, label_manager)
        if with_probabilities:
            probabilities = _probability_classes(logits, properties, plans, configuration, label_manager, None)
    return _uncrop_and_untranspose(_compact(seg), properties, plans), probabilities


def logits_to_label_map(
    logits: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    plans: dict[str, Any],
    configuration: str,
    label_manager: LabelManager,
    return_probabilities: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Undo preprocessing: logits `(K, z, y, x)` (plan grid, transposed) -> label map `(Z, Y, X)` in the input grid.

    The label map holds the dataset's label values (uint8 when they fit, else int16). With
    `return_probabilities`, also float16 probabilities `(K, Z, Y, X)` in the input grid (softmax or
    sigmoid; outside the crop box background is 1 for softmax outputs and every region 0).
    Without probabilities the logits are resampled and reduced one class at a time, so the memory
    beyond the input stays a few single-class arrays of the cropped grid, whatever K is.
    """
    seg, probabilities = _label_map_in_input_grid(logits, properties, plans, configuration, label_manager,
                                                  return_probabilities)
    if not return_probabilities:
        return seg
    full = np.empty((label_manager.num_outputs, *seg.shape), dtype=np.float16)
    for k, probability in enumerate(probabilities):
        full[k] = _class_in_input_grid(probability, k, properties, plans, label_manager)
    return seg, full


def _write_probabilities_npz(path: Path, probabilities: Iterable[np.ndarray], properties: dict[str, Any],
                             plans: dict[str, Any], label_manager: LabelManager) -> None:
    """Write `{"probabilities": float16 (K, Z, Y, X)}` as np.savez_compressed would, one class at a time, atomically."""
    shape = (label_manager.num_outputs, *(int(properties["shape_before_cropping"][a]) for a in _backward(plans)))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        with zf.open("probabilities.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)  # a 3-entry dict: always within version 1.0's limit
            for k, probability in enumerate(probabilities):
                block = np.ascontiguousarray(_class_in_input_grid(probability, k, properties, plans, label_manager))
                f.write(block.reshape(-1).view(np.uint8))


def probability_channels(label_manager: LabelManager) -> list:
    """What each probability channel means: label values, or region definitions (lists of values)."""
    return [list(r) for r in label_manager.regions] if label_manager.has_regions else list(label_manager.label_values)


def export_prediction(
    logits: torch.Tensor | np.ndarray,
    properties: dict[str, Any],
    plans: dict[str, Any],
    configuration: str,
    label_manager: LabelManager,
    output_file: str | Path,
    save_probabilities: bool = False,
) -> Path:
    """Write the label map of `logits` to `output_file` with the input's geometry; returns the path.

    With `save_probabilities`, first writes `{case}.npz` (key "probabilities": float16 `(K, Z, Y, X)` in the
    input grid) and `{case}.json` (the properties plus "probability_channels"); the label map is written
    last, so its presence means the case is complete. Every file is written atomically.
    """
    output_file = Path(output_file)
    seg, probabilities = _label_map_in_input_grid(logits, properties, plans, configuration, label_manager,
                                                  save_probabilities)
    if save_probabilities:
        stem = output_file.parent / case_stem(output_file)
        _write_probabilities_npz(stem.with_name(stem.name + ".npz"), probabilities, properties, plans, label_manager)
        del probabilities
        save_json({**properties, "probability_channels": probability_channels(label_manager)}, stem.with_name(stem.name + ".json"))
    write_seg(seg, output_file, properties)
    return output_file


def case_stem(output_file: str | Path) -> str:
    """The case id of an output file name: the name without its image file ending."""
    output_file = Path(output_file)
    name = output_file.name
    for ending in sorted(SUPPORTED_ENDINGS, key=len, reverse=True):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return output_file.stem
