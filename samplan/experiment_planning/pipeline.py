"""The `samplan_plan_and_preprocess` job: verify -> fingerprint -> plan -> preprocess, writing nothing on bad input."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from samplan.dataset.dataset_json import load_dataset_json
from samplan.dataset.verify import verify_dataset
from samplan.experiment_planning.fingerprint import extract_fingerprint
from samplan.experiment_planning.planner import plan_experiment
from samplan.paths import preprocessed_root, raw_root, resolve_dataset_name
from samplan.preprocessing.run import preprocess_dataset
from samplan.utils import load_json, save_json

FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"


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
    name = resolve_dataset_name(dataset)
    raw_dir = raw_root() / name
    dataset_json = load_dataset_json(raw_dir)
    if verify:
        verify_dataset(raw_dir, num_processes=num_processes)  # raises before anything is written

    out_dir = preprocessed_root() / name
    fp_file = out_dir / FINGERPRINT_FILE
    if fp_file.is_file() and not clean:
        print(f"using the existing fingerprint {fp_file} (pass --clean to recompute)")
        fingerprint = load_json(fp_file)
    else:
        fingerprint = extract_fingerprint(raw_dir, num_processes=num_processes)
        save_json(fingerprint, fp_file)
    shutil.copyfile(raw_dir / "dataset.json", out_dir / "dataset.json")
    if (raw_dir / "splits_final.json").is_file():
        shutil.copyfile(raw_dir / "splits_final.json", out_dir / "splits_final.json")

    plans = plan_experiment(
        name, dataset_json, fingerprint, methods=methods, overwrite_target_spacing=overwrite_target_spacing
    )
    save_json(plans, out_dir / PLANS_FILE)
    print(f"wrote {fp_file} and {out_dir / PLANS_FILE}")
    if not plan_only:
        preprocess_dataset(raw_dir, out_dir, plans, configurations=configurations, num_processes=num_processes)
    return out_dir
