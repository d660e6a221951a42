"""Names and one-line definitions of the HD95 and NSD conventions, as written into summary.json.

Kept free of numpy/scipy imports so that the CLI can offer the names as choices without slowing `-h`.
The definitions themselves are implemented in `samplan.evaluation.metrics`.
"""
from __future__ import annotations

HD95_CONVENTIONS = {
    "monai": "max of directed 95th percentiles of border-voxel distances (MONAI compute_hausdorff_distance, percentile=95)",
    "pooled": "95th percentile of both directions' border-voxel distances pooled (medpy hd95)",
}
NSD_CONVENTIONS = {
    "monai": "border voxels counted (MONAI compute_surface_dice)",
    "area_weighted": "surface elements weighted by area (DeepMind surface-distance; MONAI compute_surface_dice use_subvoxels=True)",
}
# where samplan deliberately differs from MONAI: its NaN would let a missed or hallucinated structure drop out of means
# (the text says "undefined", not "NaN": summary.json holds no NaN, and readers grep for it)
EMPTY_MASKS = ("both empty: HD95 null, NSD 1 (MONAI: undefined); one empty: HD95 = image diagonal in mm "
               "(MONAI: undefined), NSD 0")


def check_conventions(hd95_convention: str, nsd_convention: str) -> None:
    """ValueError naming the choices when either convention is unknown."""
    for what, value, choices in (("hd95", hd95_convention, HD95_CONVENTIONS), ("nsd", nsd_convention, NSD_CONVENTIONS)):
        if value not in choices:
            raise ValueError(f"unknown {what} convention {value!r}; choose one of {', '.join(choices)}")


def metric_conventions(hd95_convention: str = "monai", nsd_convention: str = "monai", nsd_tolerance_mm: float = 1.0) -> dict[str, object]:
    """How HD95 and NSD were computed, for summary.json: "name: definition" strings, the tolerance, empty masks."""
    check_conventions(hd95_convention, nsd_convention)
    return {
        "hd95": f"{hd95_convention}: {HD95_CONVENTIONS[hd95_convention]}",
        "nsd": f"{nsd_convention}: {NSD_CONVENTIONS[nsd_convention]}",
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "empty_masks": EMPTY_MASKS,
    }
