"""medsam's 3D prediction: boxes per foreground output (prompts, a reference, or the fixed policy), slice embeddings
on demand, box propagation from key slices, logits in the preprocessed grid.

Outputs: (K, Z, Y, X) with the mask logit of each foreground label; label-based datasets get channel 0 = background
= constant 0, so argmax picks the label with the largest positive logit and background where all are <= 0 (SAM's
per-label "logit > 0" rule). Regions: one sigmoid channel per region, the mask logit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from samplan.errors import SamplanError
from samplan.methods.medsam.network import REGIONS_BUFFER, planned_region_box, slice_input
from samplan.methods.medsam.plan import MedSAMSection
from samplan.methods.sam_common.decoding import channels_last, decode_boxes
from samplan.methods.sam_common.plan import litemedsam_margin_px
from samplan.methods.sam_common.slice_input import box_scale, encoder_input, logits_to_slice
from samplan.models.encoder_engine import prediction_encoder
from samplan.prompts.boxes import box_area, full_image_box, propagate, scale_box
from samplan.prompts.case_prompts import CasePrompts, ReferencePromptSettings, reference_prompts

ABSENT_LOGIT = -20.0  # slices that a label's box propagation never reached
NEEDS_BOXES = ("this medsam model was trained with reference boxes (box policy reference_jitter), so it needs a box "
               "per structure at prediction: samplan_predict --prompts FILE (boxes), or --prompt-strategy box|propagate "
               "with --reference-dir DIR; or train it with box_policy fixed_full_image / fixed_planned_region to predict "
               "without boxes.")


@dataclass(frozen=True)
class OutputBoxes:
    """The boxes of one foreground output per slice: `each` = predict exactly these slices with their boxes (several
    boxes on a slice, e.g. one per connected component, give the union of their masks); else propagate from every key
    slice (largest box first) up and down, never overwriting a slice that has its own box."""

    boxes: dict[int, list[np.ndarray]]
    each: bool


def label_groups(section: MedSAMSection, n_fg: int) -> list[list[int]]:
    """The label values of each foreground output (a region's values, or the label k + 1)."""
    return [list(r) for r in section.regions_values] if section.regions else [[k + 1] for k in range(n_fg)]


def boxes_from_prompts(prompts: CasePrompts, n_fg: int, section: MedSAMSection) -> dict[int, OutputBoxes]:
    """Per foreground output, the boxes of a case's prompts.

    Strategies "box" (a reference box on every slice) and "model" (boxes from a first-stage model's label maps)
    predict exactly those slices; "propagate" and a prompts file propagate from their boxes (the last box given on a
    slice is its key). medsam is box-prompted: a prompt without a box is an error, as is a label value that
    is not one of the model's outputs.
    """
    if section.regions:
        firsts = [int(r[0]) for r in section.regions_values]
        to_output = {v: k for k, v in enumerate(firsts)}
        what = f"the first label value of a region ({', '.join(map(str, firsts))})"
    else:
        to_output = {v: v - 1 for v in range(1, n_fg + 1)}
        what = f"a foreground label value 1..{n_fg}"
    out: dict[int, dict[int, list[np.ndarray]]] = {}
    for p in prompts.prompts:
        if p.box is None:
            raise SamplanError(f"case {prompts.case}: medsam takes box prompts, but the prompt on slice {p.slice} (label "
                               f"{p.label}) has only points; add a box, or use --prompt-strategy box or propagate.")
        if p.label not in to_output:
            raise SamplanError(f"case {prompts.case}: prompt label {p.label} on slice {p.slice} is not a medsam output; "
                               f"use {what}.")
        out.setdefault(to_output[p.label], {}).setdefault(int(p.slice), []).append(np.asarray(p.box, np.float64))
    return {k: OutputBoxes(b, each=prompts.strategy in ("box", "model")) for k, b in out.items()}


def propagation_margin(section: MedSAMSection) -> float:
    """Pixels (encoder input) added around each propagated box: the plan's `propagation_margin_px`, else half the
    training jitter (the mean outward shift the model saw), else LiteMedSAM's 3 px at 256 scaled to the input."""
    policy = section.box_policy
    if policy.propagation_margin_px is not None:
        return float(policy.propagation_margin_px)
    if policy.name == "reference_jitter":
        return float(policy.max_jitter_px) / 2
    return litemedsam_margin_px(int(section.input_size))


def propagate_from_keys(n_slices: int, keys: dict[int, np.ndarray], shape: tuple[int, int],
                        predict_slice: Callable[[int, np.ndarray], np.ndarray], margin: float = 0.0) -> None:
    """Box propagation from several key slices: each key is predicted with its own box (largest first) and
    propagated (boxes grown by `margin` px) until a prediction is empty or the walk reaches a slice already
    predicted or keyed."""
    done: set[int] = set()
    empty = np.zeros(shape, bool)
    for key in sorted(keys, key=lambda z: -box_area(keys[z])):
        def guarded(i: int, box: np.ndarray, key: int = key) -> np.ndarray:
            if i != key and (i in done or i in keys):
                return empty  # stops this direction: that slice has its own prediction
            done.add(i)
            return predict_slice(i, box)
        propagate(n_slices, key, keys[key], guarded, margin=margin)


def case_boxes(section: MedSAMSection, n_fg: int, prompts: CasePrompts | None,
               reference: np.ndarray | None) -> dict[int, OutputBoxes] | None:
    """The boxes of a case: from its prompts, else from a reference (each output's largest box, to propagate: the
    "propagate" reference prompts), else None for a fixed policy; a reference_jitter model without boxes refuses
    (trained on tight boxes, it has no answer for a box it was never shown)."""
    if prompts is not None:
        return boxes_from_prompts(prompts, n_fg, section)
    if reference is not None:
        settings = ReferencePromptSettings(strategy="propagate", label_groups=label_groups(section, n_fg))
        return boxes_from_prompts(reference_prompts("reference", reference, "propagate", settings), n_fg, section)
    if section.box_policy.name == "reference_jitter":
        raise SamplanError(NEEDS_BOXES)
    return None


class SliceDecoder:
    """One case's slices through the encoder (in chunks, on demand, kept) and boxes through the decoder."""

    def __init__(self, network: nn.Module, data: torch.Tensor, section: MedSAMSection, device: torch.device,
                 chunk: int = 2):
        self.network, self.data, self.device, self.chunk = network, data, device, chunk
        self.spec = slice_input(section)
        self.shape = tuple(int(s) for s in data.shape[-2:])
        self.scale = box_scale(*self.shape, int(section.input_size))
        # eager, or ONNX Runtime when the Predictor chose that engine (samplan.models.encoder_engine)
        self.encoder = prediction_encoder(channels_last(network.image_encoder))
        self.valid: tuple[int, int] = (0, 0)
        self._kept: dict[int, torch.Tensor] = {}

    def embed(self, start: int, stop: int) -> torch.Tensor:
        """Image embeddings of slices start..stop-1 `(B, D, h, w)`."""
        images, self.valid = encoder_input(self.data[:, start:stop].permute(1, 0, 2, 3), self.spec)
        return self.encoder(images.to(self.device).contiguous(memory_format=torch.channels_last))

    def embedding(self, i: int) -> torch.Tensor:
        """The embedding of slice i `(1, D, h, w)`, computed with its chunk on first use."""
        if i not in self._kept:
            start = i - i % self.chunk
            emb = self.embed(start, start + self.chunk)
            self._kept.update({start + j: emb[j:j + 1] for j in range(emb.shape[0])})
        return self._kept[i]

    def logits(self, emb: torch.Tensor, boxes: list[np.ndarray]) -> torch.Tensor:
        """Mask logits `(B, H, W)` on the slice grid for embeddings `(B, D, h, w)` and one slice-pixel box each."""
        bx = torch.as_tensor(np.stack([scale_box(b, self.scale) for b in boxes]), dtype=torch.float32,
                             device=self.device)
        lo = decode_boxes(self.network, emb, bx)
        return logits_to_slice(lo, self.spec.input_size, self.valid, self.shape)[:, 0].float().cpu()


def _predict_fixed(dec: SliceDecoder, fg: torch.Tensor, section: MedSAMSection) -> None:
    """Every slice with each output's fixed box (whole slice or planned region), streamed in chunks."""
    h, w = dec.shape
    policy = section.box_policy
    boxes = [full_image_box((h, w)) if policy.name == "fixed_full_image"
             else planned_region_box(dec.network, k, (h, w), float(policy.region_pad_px)) for k in range(fg.shape[0])]
    for s in range(0, fg.shape[1], dec.chunk):
        emb = dec.embed(s, s + dec.chunk)
        for k, box in enumerate(boxes):
            fg[k, s:s + emb.shape[0]] = dec.logits(emb, [box] * emb.shape[0])


def _predict_boxed(dec: SliceDecoder, fg: torch.Tensor, per_output: dict[int, OutputBoxes], margin: float) -> None:
    """The boxed slices of each output, propagated from key slices unless every slice has its own box."""
    for k, ob in per_output.items():
        def predict_slice(i: int, box: np.ndarray, k: int = k) -> np.ndarray:
            fg[k, i] = dec.logits(dec.embedding(i), [box])[0]
            return fg[k, i].numpy() > 0
        if ob.each:
            for i, boxes in ob.boxes.items():  # one decoder call for all boxes of the slice, masks merged by maximum
                emb = dec.embedding(i)
                fg[k, i] = dec.logits(emb.expand(len(boxes), *emb.shape[1:]), boxes).amax(0)
        else:
            keys = {i: boxes[-1] for i, boxes in ob.boxes.items()}
            propagate_from_keys(fg.shape[1], keys, dec.shape, predict_slice, margin=margin / dec.scale)


def predict_case(network: nn.Module, data: torch.Tensor, section: MedSAMSection, device: torch.device, *,
                 prompts: CasePrompts | None = None, reference: np.ndarray | None = None, chunk: int = 2) -> torch.Tensor:
    """Logits `(K, Z, Y, X)` float32 CPU for a preprocessed case `data` `(C, Z, Y, X)` (module docstring).

    With boxes (`case_boxes`), the given slices are predicted with them and, except for per-slice boxes, the box is
    propagated up and down (next box = box of the previous prediction) until a prediction is empty; slices not
    reached get ABSENT_LOGIT. Without boxes, a fixed policy predicts every slice with its fixed box.
    """
    network.eval()
    _, z, h, w = data.shape
    n_fg = getattr(network, REGIONS_BUFFER).shape[0]
    per_output = case_boxes(section, n_fg, prompts, reference)
    fg = torch.full((n_fg, z, h, w), ABSENT_LOGIT)
    dec = SliceDecoder(network, data, section, device, chunk)
    with torch.no_grad():
        if per_output is None:
            _predict_fixed(dec, fg, section)
        elif per_output:
            _predict_boxed(dec, fg, per_output, propagation_margin(section))
    if section.regions:
        return fg
    return torch.cat([torch.zeros((1, z, h, w)), fg])
