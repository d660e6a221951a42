"""From the U-Net's probabilities to the SAM branch's prompt rows (one per slice and prompted foreground output)."""
from __future__ import annotations

import numpy as np
import torch

from samplan.methods.autosam2.network import PromptRow
from samplan.methods.autosam2.plan import Prompt
from samplan.prompts.from_probabilities import ProbabilityPromptSettings, prompts_from_probabilities


def prompt_settings(p: Prompt) -> ProbabilityPromptSettings:
    """The planned prompt section as the prompt generator's settings."""
    return ProbabilityPromptSettings(
        threshold=p.threshold, min_pixels=p.min_pixels, points="points" in p.output, box="box" in p.output,
        num_positive=p.num_positive, positive_spacing_px=p.positive_spacing_px, num_negative=p.num_negative,
        negative_threshold=p.negative_threshold, negative_ring_px=p.negative_ring_px,
        negative_spacing_px=p.negative_spacing_px, box_dilation_px=p.box_dilation_px,
        box_pad_fraction=p.box_pad_fraction, box_pad_min_px=p.box_pad_min_px)


def foreground_probabilities(logits: torch.Tensor, regions: bool, dim: int = 0) -> torch.Tensor:
    """Probabilities of the foreground outputs from logits with the outputs along `dim`: every region (sigmoid), or
    the labels 1..K-1 of a softmax."""
    logits = logits.float()
    if regions:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=dim).narrow(dim, 1, logits.shape[dim] - 1)


def slice_rows(fg_probs: np.ndarray, settings: ProbabilityPromptSettings) -> list[list[PromptRow]]:
    """Per slice of `fg_probs` `(N, F, H, W)`, the rows of its prompted outputs (image index = slice index)."""
    out = []
    for i, slice_probs in enumerate(fg_probs):
        rows = []
        for k, prob in enumerate(slice_probs):
            prompts = prompts_from_probabilities(prob, settings)
            if prompts is not None:
                rows.append(PromptRow(i, k, prompts))
        out.append(rows)
    return out


def renumber(rows_per_slice: list[list[PromptRow]], keep: list[int]) -> list[PromptRow]:
    """The rows of the kept slices, their image index set to the position in `keep`."""
    return [PromptRow(j, r.output, r.prompts) for j, i in enumerate(keep) for r in rows_per_slice[i]]
