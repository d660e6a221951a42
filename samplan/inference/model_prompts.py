"""Prompts from another trained samplan model: the first stage of a cascade (e.g. medsam prompted by unet).

The first stage's label maps, in the original geometry as samplan_predict writes them, are preprocessed with each
image exactly like reference label maps and turned into boxes and/or points per label, slice and connected component
(samplan.prompts.from_labels). They come either from running the first-stage model on the run's images (into
`predictions_dir`, kept so that --continue reuses them) or from a folder of its predictions that exists already
(a fold's validation predictions, for leakage-free cascade validation). prompts_used.json names the model and is
not marked an oracle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samplan.errors import SamplanError
from samplan.prompts.case_prompts import PROMPTS_RECORD, CasePrompts, ReferencePromptSettings
from samplan.prompts.from_labels import model_prompts
from samplan.utils import save_json


class ModelPromptSource:
    """A prompt source (the protocol of samplan.inference.prompted.PromptSource, which the predictor calls) whose
    label maps are a first-stage model's predictions.

    `description`: what made them (method, configuration, folds, model folder), recorded with the prompts;
    `first_stage`: a Predictor that writes the missing ones into `predictions_dir` (None: they must exist).
    """

    def __init__(self, predictions_dir: str | Path, description: Mapping[str, Any], *, first_stage: Any = None,
                 file_ending: str = ".nii.gz", embedding_cache: Any = None):
        self.reference_dir = Path(predictions_dir)
        self.description = dict(description)
        self.first_stage = first_stage
        self.file_ending = file_ending
        self.embedding_cache = embedding_cache
        self.settings = ReferencePromptSettings()
        self.cases: list[str] = []
        if first_stage is None and not self.reference_dir.is_dir():
            raise SamplanError(f"first-stage predictions {self.reference_dir} do not exist; predict them first (or name "
                               "the first-stage model with --prompts-from).")

    def use_settings(self, settings: ReferencePromptSettings) -> None:
        """The method's label groups, prompt kind and box margin."""
        self.settings = settings

    def prepare(self, cases: Mapping[str, Sequence[Path]]) -> None:
        """Run the first stage on the cases it has not predicted yet (nothing when its predictions are given)."""
        if self.first_stage is None:
            return
        todo = {c: f for c, f in cases.items() if not (self.reference_dir / f"{c}{self.file_ending}").is_file()}
        if todo:
            print(f"first stage {self.description.get('method')} {self.description.get('configuration')}: predicting "
                  f"{len(todo)} case(s) into {self.reference_dir}")
            self.first_stage.predict_cases(todo, self.reference_dir, overwrite=True)

    def reference_file(self, case: str) -> Path | None:
        """The first stage's label map of `case`; SamplanError naming the folder when it is missing."""
        f = self.reference_dir / f"{case}{self.file_ending}"
        if not f.is_file():
            raise SamplanError(f"the first stage has no prediction {f} for case {case}; predict it (samplan_predict "
                               f"-m {self.description.get('method')} ...) or use --prompts-from to run it.")
        return f

    def check_cases(self, case_ids: Sequence[str]) -> None:
        """Nothing to check before the run: the label maps are made or looked up per case."""

    def for_case(self, case: str, seg: np.ndarray | None, properties: Mapping[str, Any],
                 data_shape: Sequence[int], plans: Mapping[str, Any]) -> CasePrompts:
        """Boxes and/or points per label, slice and component of the case's preprocessed first-stage label map."""
        if seg is None:
            raise SamplanError(f"case {case}: the first stage's label map was not preprocessed.")
        self.cases.append(case)
        return model_prompts(case, np.where(np.asarray(seg) < 0, 0, seg), self.settings, self.description)

    def record(self, output_dir: str | Path) -> Path:
        """Write prompts_used.json: the model that made the prompts, not an oracle."""
        path = Path(output_dir) / PROMPTS_RECORD
        s = self.settings
        save_json({"oracle": False, "strategy": "model", "source": str(self.reference_dir), "model": self.description,
                   "prompt": {"kind": s.model_prompt, "box_margin_fraction": s.box_margin,
                              "negative_point": s.negative_point, "label_groups": s.label_groups},
                   "note": "prompts from the label maps of a trained samplan model (a cascade): no reference was used",
                   "cases": sorted(set(self.cases))}, path)
        return path
