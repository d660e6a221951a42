"""medsam's network: a segment_anything Sam with the planned-regions buffer, trainable parameters per plan,
pretrained weights and the planned regions computed from the cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from samplan.errors import SamplanError
from samplan.methods.medsam.plan import MedSAMSection
from samplan.methods.sam_common.plan import num_foreground
from samplan.methods.sam_common.slice_input import SamInput
from samplan.methods.sam_common.weights import load_sam_weights
from samplan.models.backbones import build_sam_model
from samplan.models.specs import backbone_spec
from samplan.prompts.boxes import box_from_mask, full_image_box, pad_box, union_box

EMPTY_REGION = (1.0, 1.0, 0.0, 0.0)  # x0 > x1: no target seen yet
REGIONS_BUFFER = "medsam_regions"


def slice_input(section: MedSAMSection) -> SamInput:
    """How cache slices become the encoder's [0, 1] input (no pixel mean/std: MedSAM's convention)."""
    return SamInput(section.input_size, section.intensity.per_channel, section.channels.rgb_from_channels)


def trainable_prefixes(section: MedSAMSection) -> list[str]:
    """The parameter-name prefixes that train: --unfreeze's, else the planned trainable modules."""
    return list(section.unfreeze or section.trainable_modules)


def build_medsam(section: MedSAMSection, num_outputs: int) -> nn.Module:
    """The Sam model with random weights, the empty planned regions and the planned trainable parameters."""
    model = build_sam_model(section.backbone, input_size=section.input_size)
    # per foreground output: union box (x0, y0, x1, y1) in fractions of the slice, empty until planned
    model.register_buffer(REGIONS_BUFFER, torch.tensor([list(EMPTY_REGION)] * num_foreground(section.regions, num_outputs)))
    set_trainable(model, trainable_prefixes(section))
    return model


def check_modules(section: MedSAMSection) -> None:
    """Regions must come with their label values, trainable and frozen modules must not overlap, and --unfreeze
    prefixes must name parameters of the model."""
    if section.regions != (section.regions_values is not None):
        raise SamplanError("the medsam plan's 'regions' and 'regions_values' disagree; re-plan.")
    both = sorted(set(section.trainable_modules) & set(section.frozen_modules))
    if both:
        raise SamplanError(f"medsam modules {', '.join(both)} are planned both trainable and frozen; fix the plan.")
    if section.unfreeze is None:
        return
    if not section.unfreeze or not all(p for p in section.unfreeze):
        raise SamplanError(f"medsam 'unfreeze' must be a non-empty list of parameter name prefixes, got "
                           f"{section.unfreeze!r}.")
    try:
        with torch.device("meta"):  # only the parameter names are needed
            model = build_sam_model(section.backbone, input_size=section.input_size)
    except RuntimeError:  # TinyViT reads tensor values while it is built: build it for real
        model = build_sam_model(section.backbone, input_size=section.input_size)
    set_trainable(model, list(section.unfreeze))


def _matches(name: str, prefix: str) -> bool:
    p = prefix.rstrip(".")
    return name == p or name.startswith(p + ".")


def set_trainable(model: nn.Module, prefixes: list[str]) -> int:
    """requires_grad = True exactly for parameters under one of `prefixes` (dotted names); returns their count.

    A prefix that matches no parameter is an error (a typo must not silently train nothing).
    """
    names = [n for n, _ in model.named_parameters()]
    for p in prefixes:
        if not any(_matches(n, p) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise SamplanError(f"--unfreeze {p!r} matches no parameter of the medsam model; names start with "
                               f"{', '.join(tops)} (e.g. {names[0]}).")
    count = 0
    for n, param in model.named_parameters():
        param.requires_grad_(any(_matches(n, p) for p in prefixes))
        count += param.numel() if param.requires_grad else 0
    return count


def trainable_summary(model: nn.Module, prefixes: list[str]) -> str:
    """"N of M parameters trainable (modules ...)" for the training log."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters trainable ({', '.join(prefixes)})"


def label_mask(seg: np.ndarray, k: int, section: MedSAMSection) -> np.ndarray:
    """Boolean mask of foreground output k in a label map (label k+1, or region k's labels)."""
    if section.regions:
        return np.isin(seg, section.regions_values[k])
    return seg == k + 1


def planned_region_box(model: nn.Module, k: int, shape: tuple[int, int], pad: float) -> np.ndarray:
    """The planned region of foreground output k on a slice `(H, W)`, padded by `pad` px; the whole slice if unknown."""
    r = getattr(model, REGIONS_BUFFER)[k].detach().cpu().double().numpy()
    if r[0] > r[2]:
        return full_image_box(shape)
    return pad_box(r * [shape[1] - 1, shape[0] - 1, shape[1] - 1, shape[0] - 1], pad, shape)


def regions_from_cache(cache_dir: Path, section: MedSAMSection, n_fg: int) -> tuple[torch.Tensor, int]:
    """Per foreground output, the union box of its voxels over the cached cases, as fractions `(x0, y0, x1, y1)`
    of the slice (EMPTY_REGION where never seen); and the number of cases read (one at a time)."""
    from samplan.preprocessing.cache import open_case

    found: list[np.ndarray | None] = [None] * n_fg
    cases = sorted(p.name[: -len("_seg.b2nd")] for p in Path(cache_dir).glob("*_seg.b2nd"))
    for case in cases:
        _, seg, _ = open_case(cache_dir, case)
        if seg is None:
            continue
        s = np.asarray(seg[:])[0]  # (Z, H, W)
        h, w = s.shape[-2:]
        for k in range(n_fg):
            box = box_from_mask(label_mask(s, k, section).any(0))  # union over slices of the per-slice boxes
            if box is not None:
                found[k] = union_box(found[k], box / ([max(w - 1, 1), max(h - 1, 1)] * 2))
    rows = [list(r) if r is not None else list(EMPTY_REGION) for r in found]
    return torch.tensor(rows, dtype=torch.float32), len(cases)


def initialize_medsam(network: nn.Module, section: MedSAMSection, cache_dir: Path) -> str:
    """Load the planned pretrained weights and compute the planned regions (new trainings only); a log line."""
    spec = backbone_spec(section.backbone)
    source, _ = load_sam_weights(network, spec, section.checkpoint, section.input_size, (REGIONS_BUFFER,), "medsam")
    note = ""
    regions = getattr(network, REGIONS_BUFFER)
    policy = section.box_policy.name
    if policy != "fixed_full_image":
        if cache_dir.is_dir():
            found, n = regions_from_cache(cache_dir, section, regions.shape[0])
            regions.copy_(found)
            note = f"; planned regions from {n} cached case(s)"
        else:
            note = f"; no cache at {cache_dir}: planned regions = whole slice"
    elif regions.shape[0] > 1:
        # one single-mask output per box: the same box cannot ask for different labels
        note += "; note: fixed_full_image gives every label the same box, so labels cannot be told apart"
    return (f"medsam: {spec.name} at {section.input_size} px, {source}; "
            f"{trainable_summary(network, trainable_prefixes(section))}{note}")
