"""Evaluate a folder of predicted label maps against reference label maps into nnU-Net's summary.json.

Schema (as nnU-Net's `compute_metrics_on_folder`, keys sorted like its `sort_keys=True`):

    {"foreground_mean": {metric: value},
     "mean": {label_key: {metric: value}},
     "metric_per_case": [{"metrics": {label_key: {metric: value}}, "prediction_file": str, "reference_file": str}],
     "settings": {"hd95_convention": str, "ignore_label": int | null, "nsd_convention": str, "nsd_tolerance_mm": float},
     "metric_conventions": {"hd95": "name: definition", "nsd": "name: definition", "nsd_tolerance_mm": float,
                            "empty_masks": str}}

Label keys are nnU-Net's: `"1"` for a label, `"(1, 2, 3)"` for a region. Metrics per label are nnU-Net's
Dice, IoU, TP, FP, FN, TN, n_pred, n_ref plus our HD95 (mm) and NSD (at `settings.nsd_tolerance_mm`); see
`samplan.evaluation.metrics` for their definitions and the empty-mask conventions. "settings" and
"metric_conventions" are our additions (nnU-Net readers ignore them); the latter states in words which HD95
and NSD were computed (default: MONAI's), so that numbers of different conventions are never mixed up.
`mean` is the NaN-skipping mean over cases; `foreground_mean` is the NaN-skipping mean of the per-label
means, background key "0" excluded -- equal to nnU-Net's whenever nnU-Net's is defined (nnU-Net returns NaN
when one label is NaN in every case).

Also ours: "per_slice" (samplan.evaluation.per_slice: Dice/Jaccard per labelled slice along axis 0, pooled
over all labelled slices, as the lung-CT SAM paper reports them) and, for prompted predictions, "prompts"
(the prediction folder's prompts_used.json: strategy and whether the prompts came from the reference).

NaN (Dice of a label absent from both masks, HD95 likewise) is written as JSON `null`, so the file is
standard JSON; `load_summary` turns the nulls back into NaN. The dict returned by `evaluate_folders` holds
NaN floats and equals `load_summary(output_file)` up to NaN != NaN.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from samplan.dataset.image_io import SUPPORTED_ENDINGS, read_seg
from samplan.errors import DatasetError, SamplanError
from samplan.evaluation.conventions import check_conventions, metric_conventions
from samplan.evaluation.metrics import METRIC_NAMES, LabelOrRegion, case_metrics, label_key
from samplan.evaluation.per_slice import aggregate_per_slice, case_per_slice
from samplan.parallel import default_num_processes, map_cases
from samplan.prompts.case_prompts import PROMPTS_RECORD
from samplan.utils import load_json, save_json


def evaluate_case(
    reference_file: str,
    prediction_file: str,
    labels_or_regions: Sequence[LabelOrRegion],
    ignore_label: int | None = None,
    nsd_tolerance_mm: float = 1.0,
    hd95_convention: str = "monai",
    nsd_convention: str = "monai",
) -> dict[str, Any]:
    """Read one reference/prediction pair and compute its metrics (the map_cases worker; module-level)."""
    ref, props = read_seg(reference_file)
    pred, _ = read_seg(prediction_file)
    if ref.shape != pred.shape:
        raise DatasetError(
            f"prediction {prediction_file} has shape {pred.shape[1:]} but reference {reference_file} has "
            f"{ref.shape[1:]}; predictions must be exported in the reference's geometry."
        )
    metrics = case_metrics(ref, pred, labels_or_regions, props["spacing"], ignore_label, nsd_tolerance_mm,
                           hd95_convention, nsd_convention)
    # the per-slice protocol of the lung-CT SAM paper, along axis 0 (a 2D image is one slice)
    ref2, pred2 = (ref[0], pred[0]) if ref.ndim == 4 else (ref, pred)
    per_slice = case_per_slice(pred2, ref2, labels_or_regions)
    return {"metrics": metrics, "prediction_file": str(prediction_file), "reference_file": str(reference_file),
            "per_slice": per_slice}


def unique_labels(file: str) -> list[int]:
    """Sorted label values present in one label map (worker for finding labels when none are given)."""
    seg, _ = read_seg(file)
    return [int(v) for v in np.unique(seg)]


def match_cases(gt_dir: str | Path, pred_dir: str | Path, file_ending: str, only_predicted: bool = False) -> dict[str, tuple[Path, Path]]:
    """Map case id -> (reference file, prediction file); every reference needs a prediction unless `only_predicted`."""
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for d, what in ((gt_dir, "reference (-gt)"), (pred_dir, "prediction (-pred)")):
        if not d.is_dir():
            raise SamplanError(f"{what} folder {d} does not exist.")
    refs, preds = _cases(gt_dir, file_ending), _cases(pred_dir, file_ending)
    if not refs:
        raise SamplanError(f"no *{file_ending} label maps in the reference folder {gt_dir}.")
    no_ref = sorted(set(preds) - set(refs))
    if no_ref:
        raise SamplanError(
            f"{len(no_ref)} prediction(s) in {pred_dir} have no reference in {gt_dir}: {_head(no_ref)}. "
            "Check the -gt folder or remove those files."
        )
    missing = sorted(set(refs) - set(preds))
    if missing and not only_predicted:
        raise SamplanError(
            f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {_head(missing)} "
            f"(expected e.g. {pred_dir / (missing[0] + file_ending)}). Predict them, or evaluate only the "
            "predicted cases (--only-predicted)."
        )
    if not preds:
        raise SamplanError(f"no *{file_ending} predictions in {pred_dir}.")
    return {c: (refs[c], preds[c]) for c in sorted(preds)}


def _cases(folder: Path, file_ending: str) -> dict[str, Path]:
    return {p.name[: -len(file_ending)]: p for p in sorted(folder.glob(f"*{file_ending}")) if not p.name.startswith(".")}


def _head(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def evaluate_folders(
    gt_dir: str | Path,
    pred_dir: str | Path,
    labels_or_regions: Sequence[LabelOrRegion] | None,
    file_ending: str,
    output_file: str | Path | None = None,
    ignore_label: int | None = None,
    num_processes: int | None = None,
    nsd_tolerance_mm: float = 1.0,
    only_predicted: bool = False,
    progress: bool = True,
    hd95_convention: str = "monai",
    nsd_convention: str = "monai",
) -> dict[str, Any]:
    """Evaluate `pred_dir/{case}{file_ending}` against `gt_dir/{case}{file_ending}`; write summary.json if asked.

    `labels_or_regions`: ints (labels) and/or tuples (regions, evaluated as the union of their values);
    None evaluates every non-zero, non-ignore value found in the references and predictions.
    `only_predicted`: evaluate only the cases that have a prediction (nnU-Net's "chill"), e.g. a fold's
    validation folder against a full labelsTr; otherwise a missing prediction is an error.
    `hd95_convention` ("monai" or "pooled") and `nsd_convention` ("monai" or "area_weighted"): see
    `samplan.evaluation.metrics`.
    """
    try:
        check_conventions(hd95_convention, nsd_convention)
    except ValueError as e:
        raise SamplanError(f"{e} (see samplan_evaluate --hd95/--nsd).") from e
    if output_file is not None and not str(output_file).endswith(".json"):
        raise SamplanError(f"output file {output_file} must end with .json")
    pairs = match_cases(gt_dir, pred_dir, file_ending, only_predicted)
    n_proc = default_num_processes(num_processes, n_tasks=len(pairs))
    if labels_or_regions is None:
        labels_or_regions = _labels_found(pairs, ignore_label, n_proc, progress)
    targets = [tuple(int(v) for v in r) if isinstance(r, (list, tuple)) else int(r) for r in labels_or_regions]
    if not targets:
        raise SamplanError(f"nothing to evaluate: no foreground labels given or found in {gt_dir} and {pred_dir}.")
    items = [(c, (str(ref), str(pred), targets, ignore_label, float(nsd_tolerance_mm), hd95_convention, nsd_convention))
             for c, (ref, pred) in pairs.items()]
    by_case = map_cases(evaluate_case, items, n_proc, desc="evaluating", progress=progress)
    per_slice = {case: r.pop("per_slice") for case, r in by_case.items()}
    per_case = list(by_case.values())
    means, foreground_mean = summarize(per_case, [label_key(t) for t in targets])
    prompts = _prompts_record(Path(pred_dir))
    result = {
        "foreground_mean": foreground_mean,
        "mean": means,
        "metric_per_case": per_case,
        "settings": {"ignore_label": ignore_label, "nsd_tolerance_mm": float(nsd_tolerance_mm),
                     "hd95_convention": hd95_convention, "nsd_convention": nsd_convention},
        "metric_conventions": metric_conventions(hd95_convention, nsd_convention, nsd_tolerance_mm),
        "per_slice": aggregate_per_slice(per_slice, oracle=None if prompts is None else bool(prompts.get("oracle"))),
    }
    for entries in result["per_slice"]["per_case"].values():
        for entry in entries.values():
            del entry["slices"]  # one row per slice would bloat summary.json; per-case counts and means stay
    if prompts is not None:  # prompted predictions: the summary says where the prompts came from (oracle or not)
        result["prompts"] = prompts
    result = _sorted_keys(result)
    if output_file is not None:
        save_json(nan_to_none(result), output_file)
    return result


def _prompts_record(pred_dir: Path) -> dict[str, Any] | None:
    """The prompts_used.json a prompted prediction wrote into its output folder, or None."""
    f = pred_dir / PROMPTS_RECORD
    return load_json(f) if f.is_file() else None


def _labels_found(pairs: dict[str, tuple[Path, Path]], ignore_label: int | None, n_proc: int, progress: bool) -> list[int]:
    """Union of the label values of all reference and prediction files, without 0 and the ignore label."""
    items = [(str(f), (str(f),)) for files in pairs.values() for f in files]
    found = map_cases(unique_labels, items, n_proc, desc="finding labels", progress=progress)
    values = set().union(*found.values())
    return sorted(v for v in values if v != 0 and v != ignore_label)


def summarize(per_case: list[dict[str, Any]], keys: Sequence[str]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(mean per label key, foreground mean) over cases, skipping NaN; key "0" is not foreground."""
    metric_names = list(per_case[0]["metrics"][keys[0]]) if per_case else list(METRIC_NAMES)
    means = {k: {m: _nanmean([c["metrics"][k][m] for c in per_case]) for m in metric_names} for k in keys}
    fg = [k for k in keys if k != "0"]
    foreground_mean = {m: _nanmean([means[k][m] for k in fg]) for m in metric_names}
    return means, foreground_mean


def _nanmean(values: list[float]) -> float:
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN is the intended answer
        return float(np.nanmean(arr)) if arr.size else float("nan")


def _sorted_keys(obj: Any) -> Any:
    """Sort dict keys recursively (nnU-Net writes summary.json with sort_keys=True); lists keep their order."""
    if isinstance(obj, dict):
        return {k: _sorted_keys(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_sorted_keys(v) for v in obj]
    return obj


def case_dice(entry: dict[str, Any], labels: Sequence[str]) -> float:
    """Mean Dice of one per_case entry over the labels, ignoring null and NaN (NaN when every label is)."""
    return _nanmean([((entry.get("metrics") or {}).get(k) or {}).get("Dice") for k in labels])


def difference_text(d: dict[str, Any] | None) -> str:
    """A paired difference with its standard error, as find_best's "vs best" ("-0.0058 (0.0017)"); "n/a" without one."""
    if not d or d.get("difference") is None:
        return "n/a"
    se = "" if d.get("standard_error") is None else f" ({d['standard_error']:.4f})"
    return f"{d['difference']:+.4f}{se}"


def nan_to_none(obj: Any) -> Any:
    """`obj` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _none_to_nan(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: (float("nan") if v is None and k in METRIC_NAMES else _none_to_nan(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_none_to_nan(v) for v in obj]
    return obj


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read a summary.json written by `evaluate_folders`; metric nulls become NaN."""
    return _none_to_nan(load_json(path))


def infer_file_ending(folder: str | Path) -> str:
    """The one supported image ending used by the label maps in `folder`; SamplanError if none or several."""
    names = [p.name.lower() for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")] if Path(folder).is_dir() else []
    # ".nii" must not claim "x.nii.gz": take the longest matching ending per file
    found = {max((e for e in SUPPORTED_ENDINGS if n.endswith(e)), key=len) for n in names if n.endswith(SUPPORTED_ENDINGS)}
    if len(found) == 1:
        return found.pop()
    if not found:
        raise SamplanError(f"no label maps with a supported ending ({', '.join(SUPPORTED_ENDINGS)}) in {folder}.")
    raise SamplanError(f"{folder} holds label maps with several endings ({', '.join(sorted(found))}); choose one with --file-ending or -d.")


def format_summary_table(summary: dict[str, Any]) -> str:
    """A short text table: per label mean Dice, HD95 (mm), NSD, and the foreground mean."""
    tol = summary.get("settings", {}).get("nsd_tolerance_mm")
    nsd_head = f"NSD@{tol:g}mm" if tol is not None else "NSD"
    rows = [(k, v) for k, v in summary["mean"].items()] + [("foreground mean", summary["foreground_mean"])]
    width = max(len("label"), *(len(k) for k, _ in rows))
    lines = [f"{'label':<{width}}  {'Dice':>7}  {'HD95 mm':>8}  {nsd_head:>9}", "-" * (width + 32)]
    for k, m in rows:
        lines.append(f"{k:<{width}}  {_fmt(m.get('Dice'), 4):>7}  {_fmt(m.get('HD95'), 2):>8}  {_fmt(m.get('NSD'), 4):>9}")
    lines.insert(len(lines) - 1, "-" * (width + 32))
    conv = summary.get("settings", {})
    how = f"; HD95 {conv['hd95_convention']}, NSD {conv['nsd_convention']}" if "hd95_convention" in conv else ""
    return "\n".join(lines) + f"\n({len(summary['metric_per_case'])} cases{how})"


def _fmt(v: float | None, digits: int) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def dataset_settings(spec: str) -> tuple[list[LabelOrRegion], int | None, str]:
    """(labels or regions, ignore label, file ending) from a dataset's dataset.json.

    `spec` is a dataset id/name (looked up in SAMPLAN_RAW, then SAMPLAN_PREPROCESSED) or a path to a
    dataset.json or to the folder holding it. Region datasets give their regions, others their labels.
    """
    from samplan.dataset import dataset_json as dj
    from samplan.paths import preprocessed_root, raw_root, resolve_dataset_name

    path = Path(spec)
    if path.is_file():
        try:
            meta = load_json(path)
        except ValueError as e:
            raise DatasetError(f"{path} is not valid JSON ({e}).") from e
    elif (path / "dataset.json").is_file():
        meta = dj.load_dataset_json(path)
    else:
        name = resolve_dataset_name(spec)
        candidates = [raw_root() / name, preprocessed_root() / name]
        meta = dj.load_dataset_json(next((c for c in candidates if (c / "dataset.json").is_file()), candidates[0]))
    if not isinstance(meta, dict) or "labels" not in meta or "file_ending" not in meta:
        raise DatasetError(f"{spec}: dataset.json needs 'labels' and 'file_ending' to evaluate with it.")
    targets: list[LabelOrRegion] = list(dj.regions(meta)) if dj.uses_regions(meta) else list(dj.foreground_labels(meta))
    return targets, dj.ignore_label(meta), meta["file_ending"]
