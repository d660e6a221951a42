"""From dataset.json labels to network outputs and back: softmax over labels, or sigmoid over regions.

Plain labels: the network has one output per label value (background included), trained with softmax;
`segmentation = argmax`. Regions (labels given as lists of values, e.g. BraTS WT/TC/ET): one sigmoid
output per region, and the label map is painted region by region in `regions_class_order`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from samplan.dataset.dataset_json import DatasetJson, ignore_label, label_values, regions, uses_regions


@dataclass(frozen=True)
class LabelManager:
    """How label maps map onto network outputs for one dataset."""

    label_values: tuple[int, ...]            # background first, ignore excluded, plain labels only
    regions: tuple[tuple[int, ...], ...]     # region definitions (empty unless region-based)
    regions_class_order: tuple[int, ...]     # value painted for each region, in painting order
    ignore_label: int | None

    @classmethod
    def from_dataset_json(cls, dataset_json: DatasetJson) -> "LabelManager":
        """Build from a dataset.json dict."""
        ign = ignore_label(dataset_json)
        if uses_regions(dataset_json):
            regs = tuple(regions(dataset_json))
            order = tuple(int(v) for v in dataset_json.get("regions_class_order", range(1, len(regs) + 1)))
            return cls((), regs, order, ign)
        values = tuple(v for v in label_values(dataset_json) if v != ign)
        return cls(values, (), (), ign)

    @property
    def has_regions(self) -> bool:
        """True for region-based (sigmoid) training."""
        return bool(self.regions)

    @property
    def num_outputs(self) -> int:
        """Number of network output channels."""
        return len(self.regions) if self.has_regions else len(self.label_values)

    @property
    def foreground_keys(self) -> list[str]:
        """Names of the evaluated foreground classes: "1", "2" or region tuples as "(1, 2, 3)"."""
        if self.has_regions:
            return [str(r) for r in self.regions]
        return [str(v) for v in self.label_values if v != 0]

    def logits_to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """`(K, ...)` logits -> probabilities (sigmoid for regions, softmax over K otherwise)."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.has_regions else torch.softmax(logits, dim=0)

    def probabilities_to_segmentation(self, probs: torch.Tensor | np.ndarray) -> np.ndarray:
        """`(K, ...)` probabilities -> integer label map `(...)` with the dataset's label values."""
        probs = torch.as_tensor(probs)
        if self.has_regions:
            seg = torch.zeros(probs.shape[1:], dtype=torch.int16)
            for i, value in enumerate(self.regions_class_order):
                seg[probs[i] > 0.5] = value
            return seg.numpy()
        index = probs.argmax(0)
        lut = torch.tensor(self.label_values, dtype=torch.int16)
        return lut[index].numpy()

    def segmentation_to_target(self, seg: torch.Tensor) -> torch.Tensor:
        """Label map `(B, 1, ...)` -> training target: region masks `(B, R, ...)` or class indices `(B, 1, ...)`.

        Voxels outside the image's nonzero region carry -1 in the cache and are background here; the
        ignore label keeps its value so that losses can mask it.
        """
        seg = seg.long()
        if self.has_regions:
            out = torch.stack([torch.isin(seg[:, 0], torch.tensor(r, device=seg.device)) for r in self.regions], 1)
            return out.float()
        # label values are consecutive from 0 (verified with the dataset), so they are the class indices
        return torch.where(seg < 0, torch.zeros_like(seg), seg)
