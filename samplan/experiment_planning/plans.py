"""The plans file: typed dataclasses read from / written to the plain plans.json dict (the compute budget is in
samplan.experiment_planning.budget, each method's section type in its plan.py).

plans.json is the single source of truth for every later stage (schema in SCHEMAS.md). Code reads it
once at the boundary with `Plans.from_dict` / `load_plans` and then uses attributes; `to_dict` gives
back exactly the dict it was built from (unknown keys are kept in `extra`), so a round trip through
the dataclasses and JSON changes nothing. Spacings, shapes and patch sizes are in the transposed axis
order of `transpose_forward`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from samplan.errors import InputError, SamplanError
from samplan.utils import load_json, save_json

PLANS_NAME = "samplanPlans"
# the plans format: raise it whenever a change makes plans of the previous format mean something else or fail to
# load; the planner writes it and every reader checks it (check_plans_version)
PLANS_VERSION = 1
PLANS_VERSION_KEY = "plans_version"


def check_plans_version(plans: dict[str, Any], path: str | os.PathLike = "plans.json") -> None:
    """InputError unless `plans` has this samplan's plans format (plans without the key predate it: version 1)."""
    found = plans.get(PLANS_VERSION_KEY, 1)
    if type(found) is not int or found != PLANS_VERSION:
        raise InputError(
            f"{path} has plans format version {found!r}, but this samplan reads version {PLANS_VERSION}. Re-plan and "
            f"re-train with this samplan (samplan_plan_and_preprocess -d {plans.get('dataset_name', 'DATASET')}, then "
            "samplan_train), or use the samplan version that wrote these plans."
        )


def _take(d: dict[str, Any], cls: type, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `d` into the dataclass fields of `cls` (all required) and the rest; name missing keys."""
    names = [f.name for f in fields(cls) if f.name != "extra"]
    missing = [n for n in names if n not in d]
    if missing:
        raise SamplanError(f"{where} lacks {', '.join(missing)}. Re-run samplan_plan_and_preprocess to rewrite plans.json.")
    return {n: d[n] for n in names}, {k: v for k, v in d.items() if k not in names}


@dataclass
class Architecture:
    """Network class (dotted path) and its constructor kwargs, as nnU-Net writes them."""

    network_class_name: str
    arch_kwargs: dict[str, Any]
    kw_requires_import: list[str]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        """Read the plan's "architecture" entry."""
        return cls(d["network_class_name"], dict(d["arch_kwargs"]), list(d["_kw_requires_import"]))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (key `_kw_requires_import` as nnU-Net spells it)."""
        return {
            "network_class_name": self.network_class_name,
            "arch_kwargs": self.arch_kwargs,
            "_kw_requires_import": list(self.kw_requires_import),
        }


@dataclass
class ConfigurationPlan:
    """One configuration ("3d_fullres" or "2d"): grid, patch, batch, normalisation, resampling, network."""

    data_identifier: str
    spacing: list[float]
    median_image_size_in_voxels: list[float]
    patch_size: list[int]
    batch_size: int
    normalization_schemes: list[str]
    use_mask_for_norm: list[bool]
    resampling_fn_data_kwargs: dict[str, Any]
    resampling_fn_seg_kwargs: dict[str, Any]
    resampling_fn_probabilities_kwargs: dict[str, Any]
    architecture: Architecture
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """2 or 3."""
        return len(self.patch_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "configuration") -> "ConfigurationPlan":
        """Read one entry of plans["configurations"]."""
        known, extra = _take(d, cls, f"plans.json configuration {name!r}")
        known["architecture"] = Architecture.from_dict(known["architecture"])
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "architecture")}
        out["architecture"] = self.architecture.to_dict()
        return {**out, **self.extra}


@dataclass
class Plans:
    """The whole plans file: the base part shared by all methods plus one section per method."""

    dataset_name: str
    plans_name: str
    original_median_spacing_after_transp: list[float]
    original_median_shape_after_transp: list[int]
    image_reader_writer: str
    transpose_forward: list[int]
    transpose_backward: list[int]
    foreground_intensity_properties_per_channel: dict[str, dict[str, float]]
    configurations: dict[str, ConfigurationPlan]
    methods: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | os.PathLike = "plans.json") -> "Plans":
        """Read a plans.json dict; SamplanError naming the missing key if it is incomplete or of another version."""
        check_plans_version(d, where)
        known, extra = _take(d, cls, str(where))
        known["configurations"] = {k: ConfigurationPlan.from_dict(v, k) for k, v in known["configurations"].items()}
        known["methods"] = dict(known["methods"])
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, equal to the dict `from_dict` was given."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "configurations")}
        out["configurations"] = {k: v.to_dict() for k, v in self.configurations.items()}
        # keep the schema's key order: configurations before methods
        ordered = {k: out[k] for k in out if k != "methods"}
        ordered["methods"] = out["methods"]
        return {**ordered, **self.extra}

    def configuration(self, name: str) -> ConfigurationPlan:
        """One configuration by name; SamplanError listing the planned ones on a typo."""
        if name not in self.configurations:
            raise SamplanError(
                f"configuration {name!r} is not in the plans of {self.dataset_name}; planned: {', '.join(self.configurations)}."
            )
        return self.configurations[name]

    def method_section(self, name: str) -> dict[str, Any]:
        """The plan section of one method; SamplanError listing the planned methods if it is absent."""
        if name not in self.methods:
            raise SamplanError(
                f"method {name!r} has no section in the plans of {self.dataset_name} (planned: {', '.join(self.methods)}). "
                f"Re-plan with `samplan_plan_and_preprocess -d {self.dataset_name}`."
            )
        return self.methods[name]


def load_plans(path: str | os.PathLike) -> Plans:
    """Read plans.json into `Plans`."""
    if not os.path.isfile(path):
        raise SamplanError(f"{path} does not exist. Run samplan_plan_and_preprocess for this dataset first.")
    return Plans.from_dict(load_json(path), path)


def save_plans(plans: Plans | dict[str, Any], path: str | os.PathLike) -> None:
    """Write plans (dataclass or dict) to `path` atomically."""
    save_json(plans.to_dict() if isinstance(plans, Plans) else plans, path)
