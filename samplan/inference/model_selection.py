"""Which trained model to predict with: list the model folders under SAMPLAN_RESULTS, pick one, read its files.

A model folder is `SAMPLAN_RESULTS/<DatasetXXX_Name>/<method>__<plans>__<configuration>/` with plans.json
and dataset.json at its root and `fold_<k>/checkpoint_<name>.pth` inside (see samplan.paths.model_dir).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samplan.errors import InputError, SamplanError
from samplan.experiment_planning.plans import check_plans_version
from samplan.paths import parse_model_dir_name, resolve_dataset_name, results_root
from samplan.utils import load_json

_DATASET_PREFIX = "Dataset"


@dataclass(frozen=True)
class TrainedModel:
    """One trained model folder and the folds that have the requested checkpoint."""

    dataset_name: str
    method: str
    plans_name: str
    configuration: str
    path: Path
    folds: tuple[str, ...]

    def cli_args(self) -> str:
        """The samplan_predict arguments that choose this model."""
        plans = f" -p {self.plans_name}" if self.plans_name != "samplanPlans" else ""
        return f"-d {self.dataset_name} -m {self.method} -c {self.configuration}{plans}"

    def file_ending(self) -> str | None:
        """The dataset's file ending, from the model folder's dataset.json (None if unreadable)."""
        try:
            return load_json(self.path / "dataset.json")["file_ending"]
        except (OSError, ValueError, KeyError):
            return None


def _fold_sort_key(fold: str) -> tuple[int, int | str]:
    return (0, int(fold)) if fold.isdigit() else (1, fold)


def available_folds(model_dir: str | Path, checkpoint: str = "final") -> list[str]:
    """Folds ("0".."4", "all") of `model_dir` that have `checkpoint_<checkpoint>.pth`, sorted."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    folds = [p.name[len("fold_"):] for p in model_dir.glob("fold_*") if (p / f"checkpoint_{checkpoint}.pth").is_file()]
    return sorted(folds, key=_fold_sort_key)


def load_model_files(model_dir: str | Path) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(method, configuration, plans, dataset_json) of a model folder; SamplanError naming what is missing."""
    model_dir = Path(model_dir)
    parsed = parse_model_dir_name(model_dir.name)
    if not model_dir.is_dir() or parsed is None:
        raise SamplanError(
            f"{model_dir} is not a trained model folder (<method>__<plans>__<configuration> under "
            f"SAMPLAN_RESULTS/<dataset>/). Train one with samplan_train, or check -d/-m/-c."
        )
    plans, dataset_json = (_model_json(model_dir / name) for name in ("plans.json", "dataset.json"))
    check_plans_version(plans, model_dir / "plans.json")
    method, _, configuration = parsed
    return method, configuration, plans, dataset_json


def _model_json(path: Path) -> dict[str, Any]:
    """One JSON object file of a model folder; InputError when it is missing or damaged."""
    if not path.is_file():
        raise InputError(f"{path} is missing; the model folder is incomplete (copy it again or re-run samplan_train).")
    try:
        data = load_json(path)
    except ValueError as e:  # JSONDecodeError, or bytes that are no text encoding
        raise InputError(f"{path} is damaged (not valid JSON: {e}); copy the model folder again or re-run "
                         "samplan_train.") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a JSON {type(data).__name__}, not an object; copy the model folder again.")
    return data


def list_trained_models(checkpoint: str = "final") -> list[TrainedModel]:
    """Every model folder under SAMPLAN_RESULTS with at least one fold holding `checkpoint_<checkpoint>.pth`."""
    root = results_root()
    out = []
    if not root.is_dir():
        return out
    for ds in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_DATASET_PREFIX)):
        for md in sorted(p for p in ds.iterdir() if p.is_dir()):
            parsed = parse_model_dir_name(md.name)
            folds = available_folds(md, checkpoint) if parsed else []
            if folds:
                method, plans_name, configuration = parsed
                out.append(TrainedModel(ds.name, method, plans_name, configuration, md, tuple(folds)))
    return out


def select_model(
    dataset: str | int | None = None,
    method: str | None = None,
    configuration: str | None = None,
    plans_name: str | None = None,
    checkpoint: str = "final",
    input_dir: str | Path | None = None,
) -> TrainedModel:
    """The one trained model that fits the given choices (and, when `input_dir` is given, its file type).

    Raises SamplanError when none fits (with how to train one) or several do (listing the commands that
    choose each).
    """
    models = list_trained_models(checkpoint)
    dataset_name = resolve_dataset_name(dataset) if dataset is not None else None
    fits = [
        m for m in models
        if (dataset_name is None or m.dataset_name == dataset_name)
        and (method is None or m.method == method)
        and (configuration is None or m.configuration == configuration)
        and (plans_name is None or m.plans_name == plans_name)
    ]
    if input_dir is not None and len(fits) > 1:
        # several candidates: those whose file type is not in the input folder cannot apply
        endings = [m.file_ending() for m in fits]
        names = [p.name.lower() for p in Path(input_dir).iterdir()] if Path(input_dir).is_dir() else []
        matching = [m for m, e in zip(fits, endings) if e and any(n.endswith(e.lower()) for n in names)]
        fits = matching or fits
    if len(fits) == 1:
        return fits[0]
    chosen = ", ".join(f"{k} {v}" for k, v in (("-d", dataset), ("-m", method), ("-c", configuration), ("-p", plans_name)) if v is not None)
    if not fits:
        listing = "".join(f"\n  samplan_predict -i IN -o OUT {m.cli_args()}" for m in models)
        raise SamplanError(
            f"no trained model with checkpoint_{checkpoint}.pth under {results_root()} (SAMPLAN_RESULTS)"
            f"{' matches ' + chosen if chosen else ''}."
            + (f" Trained models:{listing}" if models else " Train one first: samplan_train -d DATASET -m unet -f 0")
        )
    listing = "".join(f"\n  samplan_predict -i IN -o OUT {m.cli_args()}   (folds {' '.join(m.folds)})" for m in fits)
    raise SamplanError(f"{len(fits)} trained models could be used; choose one with -d/-m/-c:{listing}")

