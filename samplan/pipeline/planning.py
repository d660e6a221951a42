"""The `samplan_plan_and_preprocess` job: verify -> fingerprint -> plan (base plan + the methods' sections) ->
preprocess, writing nothing on bad input."""
from __future__ import annotations

import copy
import importlib
import shutil
import threading
from pathlib import Path
from typing import Any, Sequence

from samplan.dataset.dataset_json import check_dataset_paths, load_dataset_json
from samplan.dataset.verify import verify_dataset
from samplan.errors import DatasetError, SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.fingerprint import analyze_arrays, extract_fingerprint, fingerprint_items
from samplan.experiment_planning.planner import plan_base
from samplan.locks import LOCK_NAME, exclusive_lock
from samplan.methods import available_methods, get_method
from samplan.paths import preprocessed_root, raw_root, resolve_dataset_name
from samplan.preprocessing.run import preprocess_dataset
from samplan.utils import atomic_path, load_json, save_json

FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"


def plan_experiment(
    dataset_name: str,
    dataset_json: dict,
    fingerprint: dict,
    methods: Sequence[str] | None = None,
    overwrite_target_spacing: Sequence[float] | None = None,
    budget: ComputeBudget | None = None,
) -> dict[str, Any]:
    """The plans.json dict: base plan + plans["methods"][name] for each method (all registered if None).

    A method that cannot serve the dataset (e.g. a 3D method and 2D images) is left out with a note when all
    methods are planned, and is an error when it was asked for by name."""
    budget = budget or ComputeBudget()
    chosen = [get_method(m) for m in (available_methods() if methods is None else methods)]  # fail before work
    plans = plan_base(dataset_name, dataset_json, fingerprint, overwrite_target_spacing, budget)
    plans["methods"] = {}
    for m in chosen:
        why = m.not_applicable(plans)
        if why and methods is not None:
            raise SamplanError(f"{why}; leave -m {m.name} out for this dataset.")
        if why:
            print(f"not planning {m.name}: {why}")
            continue
        plans["methods"][m.name] = m.plan_section(fingerprint, copy.deepcopy(plans), budget, dataset_json).to_dict()
    return plans


def plan_and_preprocess(
    dataset: str | int,
    *,
    verify: bool = True,
    plan_only: bool = False,
    methods: Sequence[str] | None = None,
    configurations: Sequence[str] | None = None,
    overwrite_target_spacing: Sequence[float] | None = None,
    num_processes: int | None = None,
    clean: bool = False,
) -> Path:
    """Run the whole planning job for one dataset and return its preprocessed folder."""
    # the planner's U-Net search needs torch (seconds to import): import it meanwhile, while workers verify
    threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()
    name = resolve_dataset_name(dataset)
    raw_dir = raw_root() / name
    dataset_json = load_dataset_json(raw_dir)
    out_dir = preprocessed_root() / name
    fp_file = out_dir / FINGERPRINT_FILE
    items = analysed = None
    if verify:
        # the fingerprint's per-case pass rides along with verification: every file is read once for both
        if clean or not fp_file.is_file():
            try:
                check_dataset_paths(raw_dir, dataset_json)  # the headers are read only inside the dataset folder
                items, analysis_bytes = fingerprint_items(raw_dir)
            except DatasetError:
                items = None  # an unreadable header: verification names it below
        analysis = (analyze_arrays, dict(items), analysis_bytes) if items else None
        analysed = verify_dataset(raw_dir, num_processes=num_processes, analysis=analysis)  # raises before any write

    # after verification (which writes nothing), before the first write: a second run stops here
    with exclusive_lock(out_dir / LOCK_NAME, f"planning/preprocessing {name}"):
        if fp_file.is_file() and not clean:
            print(f"using the existing fingerprint {fp_file} (pass --clean to recompute)")
            fingerprint = load_json(fp_file)
        else:
            fingerprint = extract_fingerprint(raw_dir, num_processes=num_processes, items=items, analysed=analysed)
            save_json(fingerprint, fp_file)
        splits = ["splits_final.json"] if (raw_dir / "splits_final.json").is_file() else []
        for f in ["dataset.json", *splits]:
            with atomic_path(out_dir / f) as tmp:  # a full disk must not leave half a dataset.json behind
                shutil.copyfile(raw_dir / f, tmp)

        plans = plan_experiment(
            name, dataset_json, fingerprint, methods=methods, overwrite_target_spacing=overwrite_target_spacing
        )
        save_json(plans, out_dir / PLANS_FILE)
        print(f"wrote {fp_file} and {out_dir / PLANS_FILE}")
        if not plan_only:
            preprocess_dataset(raw_dir, out_dir, plans, configurations=configurations, num_processes=num_processes,
                               verified=verify)
    return out_dir
