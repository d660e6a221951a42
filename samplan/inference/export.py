"""Export: the exact inverse of preprocessing, from logits on the plan's grid to a label map in the input's geometry.

Preprocessing did transpose -> crop -> normalise -> resample (samplan.preprocessing.preprocessor); export
undoes it in reverse order: resample the logits back to the cropped grid (once, all classes together,
with the plan's resampling_fn_probabilities_kwargs), turn them into a label map (argmax, or regions
painted in `regions_class_order`) while the array is still small, put it into a zero volume of the
pre-crop shape, and transpose back to the reader's axis order. The writer is the one that read the input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from samplan.dataset.image_io import SUPPORTED_ENDINGS, write_seg
from samplan.dataset.labels import LabelManager
from samplan.preprocessing.preprocessor import configuration_plan, target_spacing
from samplan.preprocessing.resampling import resample_probabilities
from samplan.utils import atomic_path, save_json

_RESAMPLING_KEYS = ("order", "order_z", "force_separate_z")


def resample_logits_to_cropped_grid(
    logits: torch.Tensor | np.ndarray, properties: dict[str, Any], plans: dict[str, Any], configuration: str
) -> np.ndarray:
    """Logits `(K, z, y, x)` on the plan's grid -> float32 `(K, *shape_after_cropping_and_before_resampling)`."""
    plan = configuration_plan(plans, configuration)
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    original_spacing = [float(properties["spacing"][a]) for a in forward]
    # the grid preprocessing resampled to: the same function computes it, so the two can never disagree
    plan_spacing = target_spacing(plan, original_spacing)
    shape = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    kwargs = {k: v for k, v in (plan.get("resampling_fn_probabilities_kwargs") or {}).items() if k in _RESAMPLING_KEYS}
    kwargs["is_seg"] = False
    return resample_probabilities(logits, shape, plan_spacing, original_spacing, **kwargs)


def _uncrop_and_untranspose(
    cropped: np.ndarray, properties: dict[str, Any], plans: dict[str, Any], fill: np.ndarray | float = 0
) -> np.ndarray:
    """`(..., *cropped)` -> `(..., *original shape)` in the reader's axis order; `fill` outside the crop box."""
    lead = cropped.shape[: cropped.ndim - 3]
    full = np.empty((*lead, *properties["shape_before_cropping"]), dtype=cropped.dtype)
    full[...] = np.reshape(fill, (*np.shape(fill), 1, 1, 1)) if np.ndim(fill) else fill
    box = tuple(slice(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"])
    full[(Ellipsis, *box)] = cropped
    backward = [int(a) for a in plans.get("transpose_backward", [0, 1, 2])]
    return full.transpose([*range(len(lead)), *(a + len(lead) for a in backward)])


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
    """
    cropped_logits = torch.from_numpy(resample_logits_to_cropped_grid(logits, properties, plans, configuration))
    probabilities = None
    if label_manager.has_regions or return_probabilities:
        probabilities = label_manager.logits_to_probabilities(cropped_logits)
    # softmax keeps the order of the logits, so the argmax needs no softmax
    seg = label_manager.probabilities_to_segmentation(probabilities if label_manager.has_regions else cropped_logits)
    fits_uint8 = seg.min(initial=0) >= 0 and seg.max(initial=0) < 256
    seg = _uncrop_and_untranspose(seg.astype(np.uint8 if fits_uint8 else np.int16), properties, plans)
    if not return_probabilities:
        return seg
    fill = np.zeros(probabilities.shape[0], dtype=np.float16)
    if not label_manager.has_regions:
        fill[0] = 1  # outside the nonzero box the image is empty: certain background
    probs = _uncrop_and_untranspose(probabilities.numpy().astype(np.float16), properties, plans, fill)
    return seg, probs


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
    result = logits_to_label_map(logits, properties, plans, configuration, label_manager, save_probabilities)
    if save_probabilities:
        seg, probs = result
        stem = output_file.parent / case_stem(output_file)
        with atomic_path(stem.with_name(stem.name + ".npz")) as tmp:
            with open(tmp, "wb") as f:  # a file object: numpy would otherwise append its own suffix
                np.savez_compressed(f, probabilities=probs)
        save_json({**properties, "probability_channels": probability_channels(label_manager)}, stem.with_name(stem.name + ".json"))
    else:
        seg = result
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
