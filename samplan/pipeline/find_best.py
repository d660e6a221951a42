"""samplan_find_best: compare single models, cascades and ensembles on the same folds and pick the best, as nnU-Net
picks among its configurations, then decide per-label largest-component post-processing.

Steps: gather the candidates (samplan.pipeline.candidates) and make what is missing (unless `run=False`); choose the
folds every kept candidate has (a candidate lacking one of them is left out with a message); ensembles of every pair
of candidates, and of all when there are more than two (probabilities averaged in the original geometry); for every
candidate the labels whose largest-component post-processing does not lower their mean Dice over the folds'
validation cases; rank by the mean foreground Dice, and give each candidate its per-case difference from the best
with the standard error of that paired difference (so a lead smaller than the noise of the validation cases is seen as
such; the ranking stays nnU-Net's: the highest mean). Writes `find_best/find_best.json` (every candidate's metrics
per label, fold and case) and `inference_instructions.json` / `.txt` in the dataset's results folder.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from samplan.dataset.image_io import read_seg
from samplan.dataset.labels import LabelManager
from samplan.errors import SamplanError
from samplan.evaluation.evaluate import (case_dice, dataset_settings, difference_text, evaluate_folders,
                                        nan_to_none, summarize)
from samplan.evaluation.metrics import confusion_counts, label_key
from samplan.inference.ensemble import ensemble_folders
from samplan.inference.export import case_stem
from samplan.inference.postprocessing import postprocess, postprocess_folder
from samplan.paths import find_best_dir, preprocessed_root, resolve_dataset_name, results_root
from samplan.pipeline.best_prediction import INSTRUCTIONS, commands
from samplan.pipeline.candidates import (Member, cascade_members, gather, needs_run,
                                         run_cascade_validation, run_single_validation)
from samplan.utils import atomic_path, load_json, save_json



@dataclass
class Candidate:
    """A single model, a cascade or an ensemble of them, optionally post-processed, with its validation results."""

    name: str
    kind: str
    members: list[Member]
    folders: dict[str, Path]
    postprocessing: list[int] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


def choose_folds(members: list[Member], folds: Sequence[str] | None) -> tuple[list[str], list[Member], list[str]]:
    """The folds to compare on (those at least half of the candidates have, or the asked ones), the candidates that
    have all of them, and a message for each one left out."""
    if folds is None:
        counts: dict[str, int] = {}
        for m in members:
            for f in m.folders:
                counts[f] = counts.get(f, 0) + 1
        folds = sorted((f for f, n in counts.items() if 2 * n >= len(members)), key=int)
    folds = [str(f) for f in folds]
    kept, notes = [], []
    for m in members:
        missing = [f for f in folds if f not in m.folders]
        if missing:
            notes.append(f"{m.name}: no fold {', '.join(missing)} (has {', '.join(m.folders) or 'none'}); left out")
        else:
            kept.append(m)
    return folds, kept, notes


def _summary_cases(folder: Path, fold: str) -> list[dict[str, Any]]:
    return [{**r, "fold": fold, "case": case_stem(Path(r["prediction_file"]))}
            for r in load_json(folder / "summary.json")["metric_per_case"]]


def score(folders: dict[str, Path], label_keys: list[str]) -> dict[str, Any]:
    """Mean metrics per label over every case of the folds, the foreground mean, and the foreground Dice per fold."""
    by_fold = {f: _summary_cases(d, f) for f, d in folders.items()}  # each summary.json read once
    per_case = [c for cases in by_fold.values() for c in cases]
    mean, fg = summarize(per_case, label_keys)
    per_fold = {f: summarize(cases, label_keys)[1].get("Dice") for f, cases in by_fold.items()}
    slim = [{"fold": c["fold"], "case": c["case"],
             "metrics": {k: {m: v.get(m) for m in ("Dice", "HD95", "NSD")} for k, v in c["metrics"].items()}}
            for c in per_case]
    return {"mean": {k: {m: v.get(m) for m in ("Dice", "HD95", "NSD")} for k, v in mean.items()},
            "foreground_mean": {m: fg.get(m) for m in ("Dice", "HD95", "NSD")}, "per_fold_dice": per_fold,
            "per_case": slim}


def case_foreground_dice(per_case: list[dict[str, Any]], label_keys: list[str]) -> dict[tuple[str, str], float]:
    """{(fold, case): mean Dice of the foreground labels present in reference or prediction} of `score`'s per_case."""
    fg = [k for k in label_keys if k != "0"]
    dices = {(c["fold"], c["case"]): case_dice(c, fg) for c in per_case}
    return {k: d for k, d in dices.items() if not np.isnan(d)}


def paired_difference(per_case: list[dict[str, Any]], best_per_case: list[dict[str, Any]],
                      label_keys: list[str]) -> dict[str, Any]:
    """Mean per-case foreground Dice of a candidate minus the best's over the cases both have, with the standard error
    of that mean (sample SD / sqrt(n); None below two cases) and the number of cases."""
    mine, best = case_foreground_dice(per_case, label_keys), case_foreground_dice(best_per_case, label_keys)
    diffs = np.array([mine[k] - best[k] for k in sorted(mine.keys() & best.keys())])
    if not diffs.size:
        return {"difference": None, "standard_error": None, "cases": 0}
    se = float(diffs.std(ddof=1) / np.sqrt(diffs.size)) if diffs.size > 1 else None
    return {"difference": float(diffs.mean()), "standard_error": se, "cases": int(diffs.size)}


def within_noise(report: dict[str, Any], factor: float = 2.0) -> list[str]:
    """Candidates (other than the best) whose mean lies within `factor` standard errors of the paired difference."""
    out = []
    for c in report["candidates"][1:]:
        diff, se = ((c.get("vs_best") or {}).get(k) for k in ("difference", "standard_error"))
        if diff is not None and se is not None and abs(diff) <= factor * se:
            out.append(c["name"])
    return out


def choose_postprocessing(folders: dict[str, Path], gt_dir: Path, labels: list[int], ending: str) -> list[int]:
    """Labels whose largest-component post-processing does not lower their mean Dice over all validation cases."""
    before: dict[int, list[float]] = {v: [] for v in labels}
    after: dict[int, list[float]] = {v: [] for v in labels}
    changed = {v: False for v in labels}
    for folder in folders.values():
        for pred_file in sorted(folder.glob(f"*{ending}")):
            pred, _ = read_seg(pred_file)
            ref, _ = read_seg(gt_dir / pred_file.name)
            for v in labels:
                pp = postprocess(pred[0], [v])
                changed[v] |= not np.array_equal(pp, pred[0])
                before[v].append(_dice(ref[0] == v, pred[0] == v))
                after[v].append(_dice(ref[0] == v, pp == v))
    return [v for v in labels if changed[v] and np.nanmean(after[v]) >= np.nanmean(before[v])]


def _dice(ref: np.ndarray, pred: np.ndarray) -> float:
    tp, fp, fn, _ = confusion_counts(ref, pred)
    return float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def _evaluate(folder: Path, gt_dir: Path, targets: list, ignore: int | None, ending: str) -> None:
    if not (folder / "summary.json").is_file():
        evaluate_folders(gt_dir, folder, targets, ending, output_file=folder / "summary.json", ignore_label=ignore,
                         num_processes=1, only_predicted=True, progress=False)


def ensembles(members: list[Member], folds: list[str], root: Path, label_manager: LabelManager, ending: str,
              progress: bool) -> list[Candidate]:
    """Every pair of members, and all of them when there are more than two, ensembled on every fold."""
    groups = [list(g) for g in itertools.combinations(members, 2)]
    if len(members) > 2:
        groups.append(list(members))
    out = []
    for group in groups:
        name = " + ".join(m.name for m in group)
        slug = "+".join(m.name.replace(" <- ", "_from_").replace(" ", "_") for m in group)
        folders = {}
        for f in folds:
            cases = [case_stem(p) for p in group[0].folders[f].glob(f"*{ending}")]
            folders[f] = root / "ensembles" / slug / f"fold_{f}"
            ensemble_folders([m.folders[f] for m in group], sorted(cases), folders[f], label_manager, ending,
                             progress=progress)
        out.append(Candidate(f"ensemble({name})", "ensemble", group, folders))
    return out


def find_best(dataset: str | int, methods: Sequence[str] | None = None, folds: Sequence[str] | None = None, *,
              run: bool = True, device: str = "auto", progress: bool = True,
              cascade_on: Sequence[str] | None = None) -> dict[str, Any]:
    """Compare every candidate of the dataset on common folds; write find_best.json and the inference instructions.

    `cascade_on`: the first stages of the cascades ("method" or "method:configuration"; default every single model).
    """
    name = resolve_dataset_name(dataset)
    root = find_best_dir(name)
    targets, ignore, ending = dataset_settings(name)
    gt_dir = preprocessed_root() / name / "gt_segmentations"
    dataset_json = load_json(preprocessed_root() / name / "dataset.json")
    label_manager = LabelManager.from_dataset_json(dataset_json)
    singles, prompted, notes = gather(name, list(methods) if methods else None)
    members = singles + cascade_members(singles, prompted, list(cascade_on) if cascade_on else None)
    if not members:
        raise SamplanError(f"no trained candidate for {name} under {results_root() / name}; train some with "
                           "samplan_train (folds 0..4), then run samplan_find_best again.")
    asked = None if folds is None else {str(f) for f in folds}
    for m in members:
        # with folds named, make only theirs: a cascade on a 5-fold first stage would otherwise run all five
        for f in [f for f in m.folders if asked is None or f in asked]:
            if needs_run(m, f, with_probabilities=True):
                if not run:
                    notes.append(f"{m.name} fold {f}: validation predictions with probabilities are missing "
                                 "(--no-run); fold not used")
                    del m.folders[f]
                elif m.kind == "single":
                    run_single_validation(m, f, device)
                else:
                    print(f"cascade {m.name}, fold {f}: predicting its validation cases")
                    run_cascade_validation(m, f, device, progress)
    folds, kept, left_out = choose_folds(members, folds)
    notes += left_out
    if not kept:
        raise SamplanError(f"no candidate has fold(s) {', '.join(folds)}: " + "; ".join(notes))
    candidates = [Candidate(m.name, m.kind, [m], {f: m.folders[f] for f in folds}) for m in kept]
    candidates += ensembles(kept, folds, root, label_manager, ending, progress)
    labels = [int(k) for k in label_manager.foreground_keys] if not label_manager.has_regions else []
    keys = [label_key(t) for t in targets]
    scored = []
    for c in candidates:
        for folder in c.folders.values():
            _evaluate(folder, gt_dir, targets, ignore, ending)
        c.result = score(c.folders, keys)
        scored.append(c)
        chosen = choose_postprocessing(c.folders, gt_dir, labels, ending) if labels else []
        if chosen:
            pp = Candidate(f"{c.name} + largest component {chosen}", c.kind, c.members,
                           {f: Path(str(d) + "_postprocessed") for f, d in c.folders.items()}, chosen)
            for f, d in c.folders.items():
                if not (pp.folders[f] / "summary.json").is_file():
                    postprocess_folder(d, pp.folders[f], chosen, ending)
                _evaluate(pp.folders[f], gt_dir, targets, ignore, ending)
            pp.result = score(pp.folders, keys)
            scored.append(pp)
    scored.sort(key=lambda c: -(c.result["foreground_mean"]["Dice"] or 0.0))
    for c in scored:
        c.result["vs_best"] = paired_difference(c.result["per_case"], scored[0].result["per_case"], keys)
    report = nan_to_none({"dataset": name, "folds": folds, "labels": keys, "notes": notes, "best": scored[0].name,
              "candidates": [_candidate_json(c) for c in scored]})
    root.mkdir(parents=True, exist_ok=True)
    save_json(report, root / "find_best.json")
    write_instructions(name, scored[0], folds, report)
    return report


def _candidate_json(c: Candidate) -> dict[str, Any]:
    return {"name": c.name, "kind": c.kind, "postprocessing": {"keep_largest_component": c.postprocessing},
            "members": [m.describe() for m in c.members], "folders": {f: str(d) for f, d in c.folders.items()},
            **c.result}


def write_instructions(dataset_name: str, best: Candidate, folds: list[str], report: dict[str, Any]) -> Path:
    """inference_instructions.json (what `samplan_predict --best` runs) and a readable .txt beside it."""
    instructions = {"dataset": dataset_name, "folds": folds, "best": nan_to_none(_candidate_json(best) | {"per_case": None}),
                    "commands": commands(dataset_name, [m.describe() for m in best.members], best.postprocessing, folds)}
    out = results_root() / dataset_name / INSTRUCTIONS
    save_json(instructions, out)
    with atomic_path(out.with_suffix(".txt")) as tmp:  # atomic: a full disk leaves the old text, never half of one
        tmp.write_text(instructions_text(report, instructions))
    return out


def instructions_text(report: dict[str, Any], instructions: dict[str, Any]) -> str:
    """The human-readable table and commands."""
    keys = report["labels"]
    lines = [f"samplan_find_best on {report['dataset']}: folds {', '.join(report['folds'])}", ""]
    header = (f"{'candidate':<70} {'fg Dice':>8} {'vs best (SE)':>17} " + " ".join(f"{'Dice ' + k:>9}" for k in keys)
              + "  per fold")
    lines += [header, "-" * len(header)]
    for c in report["candidates"]:
        per_label = " ".join(f"{(c['mean'][k]['Dice'] or float('nan')):9.4f}" for k in keys)
        folds = " ".join(f"{v:.4f}" for v in c["per_fold_dice"].values())
        vs_best = difference_text(c.get("vs_best"))
        lines.append(f"{c['name'][:70]:<70} {c['foreground_mean']['Dice']:8.4f} {vs_best:>17} {per_label}  {folds}")
    close = within_noise(report)
    lines += ["", f"best: {report['best']}",
              *([f"within two standard errors of the best (paired over the validation cases): {'; '.join(close)}"]
                if close else []),
              *[f"note: {n}" for n in report["notes"]], "",
              "to predict new images:", *[f"  {cmd}" for cmd in instructions["commands"]], ""]
    return "\n".join(lines)
