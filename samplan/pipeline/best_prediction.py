"""`samplan_predict -d D --best`: predict new images exactly as samplan_find_best's instructions say.

The instructions (`$SAMPLAN_RESULTS/<dataset>/inference_instructions.json`) name the best candidate: one model, a
cascade (a prompted model whose prompts come from a first-stage model's label maps) or an ensemble of those, each
with the cross-validation folds find_best compared, and the labels to post-process (largest component). Members
predict into `{output}/members/<member>/` (with probabilities when they are ensembled), the ensemble's mean and the
post-processing give the label maps in `{output}/`, in the images' geometry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from samplan.errors import SamplanError
from samplan.paths import resolve_dataset_name, results_root
from samplan.utils import load_json, save_json

INSTRUCTIONS = "inference_instructions.json"


def _slug(name: str) -> str:
    return name.replace(" <- ", "_from_").replace(" ", "_").replace("/", "_")


def commands(dataset_name: str, members: Sequence[dict[str, Any]], postprocessing: Sequence[int],
             folds: Sequence[str]) -> list[str]:
    """`samplan_predict --best`, then what it amounts to, member by member (as shell comments); `members` as
    find_best describes them."""
    out = [f"samplan_predict -d {dataset_name} --best -i INPUT_DIR -o OUTPUT_DIR"]
    ensemble = len(members) > 1
    for d in members:
        own = folds if all(f in _trained_folds(Path(d["model_dir"])) for f in folds) else ["all"]
        cmd = (f"# = samplan_predict -d {dataset_name} -m {d['method']} -c {d['configuration']} -f {' '.join(own)} "
               f"-i INPUT_DIR -o OUTPUT_DIR/members/{_slug(d['name'])}")
        if "first_stage" in d:
            fs = d["first_stage"]
            cmd += f" --prompts-from {fs['method']} -pc {fs['configuration']} -pf {' '.join(folds)}"
        out.append(cmd + (" --save-probabilities" if ensemble else ""))
    if ensemble:
        out.append("#   then the members' probabilities averaged (samplan.inference.ensemble)")
    if postprocessing:
        out.append(f"#   then only the largest connected component kept for label(s) {', '.join(map(str, postprocessing))}")
    return out


def load_instructions(dataset: str | int) -> dict[str, Any]:
    """The dataset's inference instructions; SamplanError saying how to make them when they are missing."""
    name = resolve_dataset_name(dataset)
    path = results_root() / name / INSTRUCTIONS
    if not path.is_file():
        raise SamplanError(f"{path} does not exist; run samplan_find_best -d {name} first.")
    return load_json(path)


def _member_predictor(d: dict[str, Any], folds: list[str], output_dir: Path, device: str, precision: str,
                      tta: bool, encoder_engine: str | None = None) -> Any:
    """The Predictor of one member; a cascade's first stage runs into `{output}/members/<first stage>/`."""
    from samplan.inference.model_prompts import ModelPromptSource
    from samplan.inference.predictor import Predictor
    from samplan.methods.sam_common.embedding_cache import EmbeddingCache

    model_dir = Path(d["model_dir"])
    source = None
    if "first_stage" in d:
        fs = d["first_stage"]
        stage = Predictor.from_model_dir(fs["model_dir"], folds=folds, device=device, tta=tta, precision=precision,
                                         encoder_engine=encoder_engine)
        ending = load_json(model_dir / "dataset.json")["file_ending"]
        # the first stage writes where it would as a member of its own: an ensemble holding it predicts it once
        source = ModelPromptSource(output_dir / "members" / _slug(fs["name"]),
                                   {"method": fs["method"], "configuration": fs["configuration"], "folds": folds,
                                    "model_dir": fs["model_dir"]}, first_stage=stage, file_ending=ending,
                                   embedding_cache=EmbeddingCache(model_dir / "embedding_cache"))
    # a method without training has only fold "all": it saw no case, so it serves every fold
    own = folds if all(f in _trained_folds(model_dir) for f in folds) else ["all"]
    return Predictor.from_model_dir(model_dir, folds=own, device=device, tta=tta, precision=precision,
                                    prompt_source=source, encoder_engine=encoder_engine)


def _trained_folds(model_dir: Path) -> list[str]:
    from samplan.inference.model_selection import available_folds

    return available_folds(model_dir, "final")


def predict_best(dataset: str | int, input_dir: str | Path, output_dir: str | Path, *, device: str = "auto",
                 precision: str = "auto", tta: bool = True, overwrite: bool = True,
                 encoder_engine: str | None = None) -> list[Path]:
    """Segment every case of `input_dir` with the best candidate of the dataset's instructions into `output_dir`
    (`encoder_engine`: see samplan.inference.predictor.Predictor)."""
    from samplan.dataset.dataset_json import group_images_by_case
    from samplan.dataset.labels import LabelManager
    from samplan.inference.ensemble import ensemble_folders
    from samplan.inference.postprocessing import postprocess_folder

    instructions = load_instructions(dataset)
    best, folds = instructions["best"], [str(f) for f in instructions["folds"]]
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise SamplanError(f"input folder {input_dir} does not exist.")
    members = best["members"]
    first_model = Path(members[0]["model_dir"])
    dataset_json = load_json(first_model / "dataset.json")
    ending = dataset_json["file_ending"]
    cases = group_images_by_case(input_dir, ending)
    if not cases:
        raise SamplanError(f"{input_dir} holds no images named {{case}}_{{XXXX}}{ending}.")
    labels_pp = [int(v) for v in best["postprocessing"]["keep_largest_component"]]
    direct = len(members) == 1 and not labels_pp
    print(f"best: {best['name']} (folds {', '.join(folds)})")
    predictors = [_member_predictor(d, folds, output_dir, device, precision, tta, encoder_engine) for d in members]
    member_dirs = []
    for d, predictor in zip(members, predictors):
        target = output_dir if direct else output_dir / "members" / _slug(d["name"])
        predictor.predict_cases(cases, target, save_probabilities=len(members) > 1, overwrite=overwrite)
        member_dirs.append(target)
    if len(members) > 1:
        merged = output_dir / "members" / "ensemble" if labels_pp else output_dir
        ensemble_folders(member_dirs, sorted(cases), merged, LabelManager.from_dataset_json(dataset_json), ending)
        member_dirs = [merged]
    if labels_pp:
        postprocess_folder(member_dirs[0], output_dir, labels_pp, ending)
    save_json(instructions, output_dir / INSTRUCTIONS)  # what made these label maps
    return [output_dir / f"{c}{ending}" for c in sorted(cases)]
