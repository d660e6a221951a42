"""The Method interface: what every segmentation method in samplan provides to the generic stages.

For now a method only contributes its plan section; network, training and prediction hooks are
added by later stages. A method is a stateless object registered by name in `samplan.methods`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from samplan.experiment_planning.plans import ComputeBudget


class Method(ABC):
    """One segmentation method; subclasses set the three class attributes and implement `plan_section`."""

    name: str = ""
    # "2d": works on slices of the transposed volume; "3d": works on 3D patches
    dimensionality: str = ""
    needs_training: bool = True

    @abstractmethod
    def plan_section(
        self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget, dataset_json: dict[str, Any]
    ) -> dict[str, Any]:
        """This method's section of plans.json (plain JSON data), from the fingerprint and the base plan.

        `base_plan` is the plans dict without "methods" (configurations already planned; a copy, so
        changing it has no effect): a section references its configurations by name. `dataset_json`
        gives what the fingerprint does not: channel names, labels and regions.
        """

    def __repr__(self) -> str:
        return f"<method {self.name} ({self.dimensionality}, {'trained' if self.needs_training else 'no training'})>"
