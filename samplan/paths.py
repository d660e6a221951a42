"""Where samplan keeps raw data, preprocessed caches and results, and dataset id <-> name lookup."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from samplan.errors import SamplanError

_ENV_DEFAULTS = {
    "SAMPLAN_RAW": "raw",
    "SAMPLAN_PREPROCESSED": "preprocessed",
    "SAMPLAN_RESULTS": "results",
}
_noted: set[str] = set()
_DATASET_DIR = re.compile(r"^Dataset(\d{3})_(.+)$")


def _env_path(var: str) -> Path:
    """Return the folder named by `var`, or its default under ~/samplan_data with a one-line note."""
    value = os.environ.get(var)
    if value:
        return Path(value).expanduser()
    default = Path.home() / "samplan_data" / _ENV_DEFAULTS[var]
    if var not in _noted:
        _noted.add(var)
        print(f"note: {var} is not set; using {default}", file=sys.stderr)
    return default


def raw_root() -> Path:
    """Folder holding raw datasets (env SAMPLAN_RAW)."""
    return _env_path("SAMPLAN_RAW")


def preprocessed_root() -> Path:
    """Folder holding fingerprints, plans and preprocessed caches (env SAMPLAN_PREPROCESSED)."""
    return _env_path("SAMPLAN_PREPROCESSED")


def results_root() -> Path:
    """Folder holding trained models (env SAMPLAN_RESULTS)."""
    return _env_path("SAMPLAN_RESULTS")


def _known_datasets() -> list[str]:
    """All DatasetXXX_Name folders found in the raw, preprocessed and results roots."""
    names: set[str] = set()
    for root in (raw_root(), preprocessed_root(), results_root()):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir() and _DATASET_DIR.match(p.name))
    return sorted(names)


def resolve_dataset_name(spec: str | int) -> str:
    """Map `4`, `004`, `Dataset004_Hippocampus` or `hippocampus` to the one matching dataset folder name."""
    spec = str(spec).strip()
    known = _known_datasets()
    if spec.isdigit():
        matches = [n for n in known if int(_DATASET_DIR.match(n).group(1)) == int(spec)]
    elif _DATASET_DIR.match(spec):
        matches = [n for n in known if n == spec]
    else:
        matches = [n for n in known if _DATASET_DIR.match(n).group(2).lower() == spec.lower()]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(known) if known else "(none)"
    if not matches:
        raise SamplanError(
            f"no dataset matches '{spec}' in {raw_root()} (SAMPLAN_RAW) or {preprocessed_root()} "
            f"(SAMPLAN_PREPROCESSED). Known datasets: {listing}. Use an id (4), a full name "
            f"(Dataset004_Hippocampus) or a bare name (Hippocampus), or set SAMPLAN_RAW."
        )
    raise SamplanError(
        f"'{spec}' matches several datasets: {', '.join(matches)}. Give the full folder name instead."
    )


def dataset_id(name: str) -> int:
    """Integer id of a `DatasetXXX_Name` folder name."""
    m = _DATASET_DIR.match(name)
    if not m:
        raise SamplanError(f"'{name}' is not a dataset folder name of the form DatasetXXX_Name")
    return int(m.group(1))


def model_dir(dataset_name: str, method: str, configuration: str, plans_name: str = "samplanPlans") -> Path:
    """Trained-model folder `SAMPLAN_RESULTS/<dataset>/<method>__<plans>__<configuration>` (folds inside)."""
    return results_root() / dataset_name / f"{method}__{plans_name}__{configuration}"


def parse_model_dir_name(name: str) -> tuple[str, str, str] | None:
    """(method, plans_name, configuration) from a model folder name, or None if it is not one."""
    parts = name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


FIND_BEST_DIR = "find_best"  # samplan_find_best's folder inside a dataset's results folder


def find_best_dir(dataset_name: str) -> Path:
    """Where samplan_find_best keeps its cascades, ensembles and find_best.json for a dataset."""
    return results_root() / dataset_name / FIND_BEST_DIR
