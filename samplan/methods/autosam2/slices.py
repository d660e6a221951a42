"""Which slices of a volume (or patch) the SAM branch sees: AutoSAM2's depth bands, torch-free.

Of n = round(fraction * depth) slices, half go to the central band (40-60 % of the depth), 30 % to the two
middle bands (20-40 % and 60-80 %) and the rest to the two outer bands (0-20 % and 80-100 %), evenly spaced in
each band. Fixes of the reference's rule: a fraction of 0 selects no slice (the reference still sent one), any n
works (the reference divides by zero for n = 6), and slices lost to rounding collisions are replaced by the
unselected slices nearest the centre, so exactly n distinct slices come back.
"""
from __future__ import annotations

import math

# (band start, band end) as fractions of the depth, and each group's share of the slices
CENTRE_BAND = ((0.4, 0.6),)
MIDDLE_BANDS = ((0.2, 0.4), (0.6, 0.8))
OUTER_BANDS = ((0.0, 0.2), (0.8, 1.0))
CENTRE_SHARE, MIDDLE_SHARE = 0.5, 0.3


def num_selected(depth: int, fraction: float) -> int:
    """How many of `depth` slices a fraction selects: round(fraction * depth), within [0, depth]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"slice fraction must be in [0, 1], got {fraction}")
    return min(int(depth), int(math.floor(fraction * depth + 0.5)))


def _spread(bands: tuple[tuple[float, float], ...], n: int, depth: int) -> list[int]:
    """n slice indices spread over `bands` (split as evenly as possible, the later band taking the odd one),
    evenly spaced inside each band (at the centres of n equal parts)."""
    out: list[int] = []
    for i, (lo, hi) in enumerate(bands):
        k = n // len(bands) + (1 if i >= len(bands) - n % len(bands) else 0)
        start, width = lo * depth, (hi - lo) * depth
        out += [min(depth - 1, int(start + (j + 0.5) * width / k)) for j in range(k)]
    return out


def select_slices(depth: int, fraction: float) -> list[int]:
    """Sorted distinct indices of the slices (0..depth-1) the SAM branch processes (module docstring)."""
    n = num_selected(depth, fraction)
    if n == 0:
        return []
    centre = int(math.floor(CENTRE_SHARE * n + 0.5))
    middle = int(math.floor(MIDDLE_SHARE * n + 0.5))
    middle = min(middle, n - centre)
    chosen = set(_spread(CENTRE_BAND, centre, depth) + _spread(MIDDLE_BANDS, middle, depth)
                 + _spread(OUTER_BANDS, n - centre - middle, depth))
    if len(chosen) < n:  # rounding put two slices on one index: fill with the free slices nearest the centre
        free = sorted((i for i in range(depth) if i not in chosen), key=lambda i: (abs(i + 0.5 - depth / 2), i))
        chosen.update(free[: n - len(chosen)])
    return sorted(chosen)
