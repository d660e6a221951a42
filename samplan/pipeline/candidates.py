"""What samplan_find_best compares: the trained models of a dataset as candidates with validation predictions per fold.

A *single* candidate is a trained model that predicts without prompts (unet, samunetr, a fixed-box medsam); its
fold-k predictions are the final validation of fold k (`fold_k/validation/`). A *cascade* is a prompted model
(samzeroshot, a box-trained medsam) whose prompts come from a single candidate's label maps: on fold k it predicts
fold k's validation cases with its own fold-k model (fold "all" for a method without training, which saw no case)
and prompts from the first stage's fold-k validation predictions, so neither stage saw the case
(`find_best/cascades/<second>__from__<first>/fold_k/`). What is missing and cheap is made here: a final
validation with probabilities (`samplan_train --val --npz`), a cascade's validation predictions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samplan.inference.export import case_stem
from samplan.inference.model_selection import TrainedModel, list_trained_models
from samplan.methods import get_method
from samplan.paths import find_best_dir
from samplan.utils import load_json, save_json



@dataclass
class Member:
    """A single model or a cascade, with its validation-prediction folder per fold."""

    name: str
    kind: str  # "single" | "cascade"
    model: TrainedModel
    first_stage: "Member | None" = None
    folders: dict[str, Path] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Plain data for find_best.json and inference_instructions.json."""
        m = self.model
        out = {"name": self.name, "kind": self.kind, "method": m.method, "configuration": m.configuration,
               "plans_name": m.plans_name, "model_dir": str(m.path), "folds": list(self.folders)}
        if self.first_stage is not None:
            out["first_stage"] = self.first_stage.describe()
        return out


def model_name(model: TrainedModel) -> str:
    """'method configuration' (plans named when not the default)."""
    plans = "" if model.plans_name == "samplanPlans" else f" ({model.plans_name})"
    return f"{model.method} {model.configuration}{plans}"


def _is_oracle(summary_file: Path) -> bool:
    """True when a validation summary says its prompts came from the references."""
    return bool((load_json(summary_file).get("prompts") or {}).get("oracle")) if summary_file.is_file() else False


def gather(dataset_name: str, methods: list[str] | None = None) -> tuple[list[Member], list[TrainedModel], list[str]]:
    """Single candidates, prompted models (cascade second stages) and notes about models that cannot take part."""
    singles, prompted, notes = [], [], []
    for model in list_trained_models():
        if model.dataset_name != dataset_name or (methods and model.method not in methods):
            continue
        method = get_method(model.method)
        plans = load_json(model.path / "plans.json")
        mp = method.check_plan(plans, model.configuration, plans_file=model.path / "plans.json")
        if method.missing_prompts_error(mp) is not None:
            prompted.append(model)
            continue
        folds = [f for f in model.folds if f != "all"]
        if not folds:
            notes.append(f"{model_name(model)}: only fold 'all' is trained; cross-validation needs folds 0..4")
            continue
        member = Member(model_name(model), "single", model,
                        folders={f: model.path / f"fold_{f}" / "validation" for f in folds})
        oracle = [f for f, d in member.folders.items() if _is_oracle(d / "summary.json")]
        if oracle:
            notes.append(f"{member.name}: its validation of fold(s) {', '.join(oracle)} used reference prompts (an "
                         "oracle); left out")
            continue
        singles.append(member)
    return singles, prompted, notes


def cascade_members(singles: list[Member], prompted: list[TrainedModel],
                    first_stages: list[str] | None = None) -> list[Member]:
    """Every prompted model on every single candidate (or on those named in `first_stages`, "method" or
    "method:configuration"), on the folds both have (fold 'all' of an untrained one serves every fold)."""
    def chosen(m: Member) -> bool:
        return not first_stages or any(f in (m.model.method, f"{m.model.method}:{m.model.configuration}")
                                       for f in first_stages)

    out = []
    for second in prompted:
        untrained = not get_method(second.method).needs_training
        for first in filter(chosen, singles):
            folds = [f for f in first.folders if f in second.folds or (untrained and "all" in second.folds)]
            if not folds:
                continue
            where = (find_best_dir(second.dataset_name) / "cascades" /
                     f"{second.method}__{second.configuration}__from__{first.model.method}__{first.model.configuration}")
            out.append(Member(f"{model_name(second)} <- {first.name}", "cascade", second, first,
                              {f: where / f"fold_{f}" for f in folds}))
    return out


def model_fold(member: Member, fold: str) -> str:
    """The fold of the member's own model that predicts fold `fold` (an untrained model's 'all')."""
    return fold if fold in member.model.folds else "all"


def needs_run(member: Member, fold: str, with_probabilities: bool) -> bool:
    """True when the member's fold lacks an evaluated validation (or, when asked, its probabilities)."""
    folder = member.folders[fold]
    if not (folder / "summary.json").is_file():
        return True
    if not with_probabilities:
        return False
    cases = [r["prediction_file"] for r in load_json(folder / "summary.json")["metric_per_case"]]
    return any(not (folder / f"{case_stem(c)}.npz").is_file() for c in cases)


def run_single_validation(member: Member, fold: str, device: str = "auto") -> None:
    """The final validation of a single candidate's fold again, with probabilities (samplan_train --val --npz)."""
    from samplan.pipeline.train import train_fold

    m = member.model
    plans = load_json(m.path / "plans.json")
    overrides = plans["methods"][m.method]  # the model folder's section (with the training's overrides)
    train_fold(m.dataset_name, m.method, m.configuration, int(fold), only_validate=True, save_probabilities=True,
               device=device, method_overrides=overrides)


def run_cascade_validation(member: Member, fold: str, device: str = "auto", progress: bool = True) -> Path:
    """Predict the first stage's fold-k validation cases with the second stage's fold-k model, prompted by the
    first stage's fold-k predictions, with probabilities; evaluate them into summary.json."""
    from samplan.dataset.dataset_json import group_images_by_case
    from samplan.evaluation.evaluate import dataset_settings, evaluate_folders
    from samplan.inference.model_prompts import ModelPromptSource
    from samplan.inference.predictor import Predictor
    from samplan.methods.sam_common.embedding_cache import EmbeddingCache
    from samplan.paths import preprocessed_root, raw_root

    second, first = member.model, member.first_stage
    dataset_json = load_json(second.path / "dataset.json")
    ending = dataset_json["file_ending"]
    first_dir = first.folders[fold]
    cases = sorted(case_stem(p) for p in first_dir.glob(f"*{ending}"))
    images = group_images_by_case(raw_root() / second.dataset_name / "imagesTr", ending)
    source = ModelPromptSource(first_dir, {**first.describe(), "folds": [fold], "validation_of_fold": fold},
                               file_ending=ending, embedding_cache=EmbeddingCache(second.path / "embedding_cache"))
    predictor = Predictor.from_model_dir(second.path, folds=[model_fold(member, fold)], checkpoint="final",
                                         device=device, progress=progress, prompt_source=source)
    out_dir = member.folders[fold]
    out_dir.mkdir(parents=True, exist_ok=True)
    # which models and cases made this fold: the record that no stage saw a case it predicts
    save_json({"fold": fold, "cases": cases, "second_stage": {**member.describe(), "model_fold": model_fold(member, fold)},
               "first_stage": {**first.describe(), "model_fold": fold, "predictions": str(first_dir)}},
              out_dir / "cascade.json")
    predictor.predict_cases({c: images[c] for c in cases}, out_dir, save_probabilities=True, overwrite=False)
    targets, ignore, _ = dataset_settings(str(second.path / "dataset.json"))
    evaluate_folders(preprocessed_root() / second.dataset_name / "gt_segmentations", out_dir, targets, ending,
                     output_file=out_dir / "summary.json", ignore_label=ignore, num_processes=1, only_predicted=True,
                     progress=False)
    return out_dir
