"""Where a prediction run's prompts come from: a user's prompts file, or reference label maps with a strategy.

A prompts file (samplan.prompts.prompts_file; raw voxel or world coordinates) is mapped through the preprocessing's
transpose, crop and resampling; a reference label map per case (`{reference_dir}/{case}{file_ending}`, read and
preprocessed exactly like the image) becomes the paper's oracle point prompts ("oracle"), boxes ("box") or one
key-slice box that the method propagates ("propagate") (samplan.prompts.case_prompts). Reference-derived prompts
are an oracle: `PromptSource.record` writes prompts_used.json (`"oracle": true`, the strategy) into the prediction
folder so that results stay labelled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samplan.errors import SamplanError
from samplan.prompts.case_prompts import (PROMPTS_RECORD, REFERENCE_STRATEGIES, CasePrompts, ReferencePromptSettings,
                                          file_prompts, reference_prompts)
from samplan.utils import save_json


class PromptSource:
    """Where a prediction run's prompts come from: a prompts file, or reference label maps with a strategy.

    `use_settings(settings)` takes the method's reference-prompt settings (its default strategy among them) before a
    run; `reference_file(case)` is the label map the predictor preprocesses with the image (None for a file source);
    `for_case(case, seg, properties, data_shape, plans)` gives the case's prompts. `embedding_cache` (or None) is
    handed to the method with them.
    """

    def __init__(self, *, prompts_file: str | Path | None = None, strategy: str | None = None,
                 reference_dir: str | Path | None = None, file_ending: str = ".nii.gz", embedding_cache: Any = None):
        if (prompts_file is None) == (reference_dir is None):
            raise SamplanError("give either a prompts file (--prompts) or reference label maps (--reference-dir with "
                               "--prompt-strategy oracle|box|propagate), not both or neither.")
        self.prompts_file = None if prompts_file is None else Path(prompts_file)
        self.reference_dir = None if reference_dir is None else Path(reference_dir)
        # a reference strategy left open is the method's default (use_settings)
        self.strategy: str | None = "file" if prompts_file is not None else strategy
        if self.reference_dir is not None and strategy is not None:
            self._check_strategy(strategy)
        if self.prompts_file is not None and not self.prompts_file.is_file():
            raise SamplanError(f"prompts file {self.prompts_file} does not exist.")
        if self.reference_dir is not None and not self.reference_dir.is_dir():
            raise SamplanError(f"reference folder {self.reference_dir} does not exist.")
        self.file_ending = file_ending
        self.embedding_cache = embedding_cache
        self.settings = ReferencePromptSettings()
        self.cases: list[str] = []
        self._entries: dict[str, list[dict]] | None = None

    @staticmethod
    def _check_strategy(strategy: str) -> None:
        if strategy not in REFERENCE_STRATEGIES:
            raise SamplanError(f"--prompt-strategy {strategy!r} needs one of {', '.join(REFERENCE_STRATEGIES)} with "
                               "--reference-dir.")

    def use_settings(self, settings: ReferencePromptSettings) -> None:
        """The method's settings for reference prompts; its default strategy applies when none was given."""
        self.settings = settings
        if self.strategy is None:
            self._check_strategy(settings.strategy)
            self.strategy = settings.strategy

    @property
    def oracle(self) -> bool:
        """True when the prompts derive from reference masks."""
        return self.reference_dir is not None

    def prepare(self, cases: Mapping[str, Sequence[Path]]) -> None:
        """Make what the cases' prompts need before they are predicted (nothing for a file or reference source)."""

    def reference_file(self, case: str) -> Path | None:
        """The reference label map of `case` (SamplanError when missing), or None for a prompts file."""
        if self.reference_dir is None:
            return None
        f = self.reference_dir / f"{case}{self.file_ending}"
        if not f.is_file():
            raise SamplanError(f"no reference label map {f} for case {case}; --reference-dir needs {{case}}{self.file_ending} per case.")
        return f

    def check_cases(self, case_ids: Sequence[str]) -> None:
        """Before any output: a prompts file must parse and name only cases of this run (every problem at once)."""
        if self.prompts_file is None:
            return
        from samplan.prompts.prompts_file import PromptsFileError

        known = set(case_ids)
        unknown = [c for c in self._file_entries() if c not in known]
        if unknown:
            shown = ", ".join(sorted(known)[:5]) + (", ..." if len(known) > 5 else "")
            raise PromptsFileError(self.prompts_file, [
                f"{self.prompts_file}: cases[{c!r}]: no such case among the input images (known: {shown}); fix the "
                "identifier or add the image." for c in unknown])

    def _file_entries(self) -> dict[str, list[dict]]:
        """The prompts file's schema-checked entries per case, read once per run."""
        if self._entries is None:
            from samplan.prompts.prompts_file import read_prompts_file

            self._entries = read_prompts_file(self.prompts_file)
        return self._entries

    def _file_prompts_raw(self, case: str, properties: Mapping[str, Any], plans: Mapping[str, Any]) -> list[Any]:
        """The case's validated prompts-file entries on its raw grid (shape from the recorded pre-crop shape)."""
        from samplan.prompts.prompts_file import ImageGrid, PromptsFileError, case_prompts

        forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
        transposed = [int(s) for s in properties["shape_before_cropping"]]
        raw_shape = [transposed[forward.index(j)] for j in range(3)]
        entries = self._file_entries().get(case, [])
        prompts, problems = case_prompts(entries, ImageGrid.from_properties(raw_shape, properties), f"cases[{case!r}]")
        if problems:
            raise PromptsFileError(self.prompts_file, [f"{self.prompts_file}: {p}" for p in problems])
        return prompts

    def for_case(self, case: str, seg: np.ndarray | None, properties: Mapping[str, Any],
                 data_shape: Sequence[int], plans: Mapping[str, Any]) -> CasePrompts:
        """The prompts of one preprocessed case `(C, Z, Y, X)` on its grid; `seg` is its preprocessed reference."""
        self.cases.append(case)
        if self.reference_dir is not None:
            if seg is None:
                raise SamplanError(f"case {case}: the reference label map was not preprocessed.")
            strategy = self.strategy or self.settings.strategy
            return reference_prompts(case, np.where(np.asarray(seg) < 0, 0, seg), strategy, self.settings)
        if case not in self._file_entries():
            return CasePrompts(case, [], "file", oracle=False)
        return file_prompts(case, self._file_prompts_raw(case, properties, plans), properties, plans, data_shape)

    def record(self, output_dir: str | Path) -> Path:
        """Write prompts_used.json (oracle flag, strategy, source, cases) into the prediction folder."""
        path = Path(output_dir) / PROMPTS_RECORD
        save_json({"oracle": self.oracle, "strategy": self.strategy or self.settings.strategy,
                   "source": str(self.reference_dir if self.oracle else self.prompts_file),
                   "note": "prompts derived from the reference masks: an oracle protocol, not a fully automatic result"
                   if self.oracle else "prompts from a user's prompts file",
                   "cases": sorted(set(self.cases))}, path)
        return path
