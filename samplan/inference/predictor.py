"""Predictor: preprocess (the training code) -> the method's dense prediction, averaged over folds -> export.

`Predictor.from_model_dir` loads a trained model folder (plans.json and dataset.json at its root,
fold_<k>/checkpoint_<name>.pth inside). `predict_array` segments an in-memory image; `predict_cases`
segments files, preprocessing the next case in a worker while the network runs and writing the
previous case's result in a background thread.
"""
from __future__ import annotations

import sys
from collections import deque
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from samplan.dataset.labels import LabelManager
from samplan.errors import DatasetError, InputError, SamplanError
from samplan.devices import autocast, resolve_device
from samplan.engine.dense import row_slabs
from samplan.inference.export import export_prediction, logits_to_label_map
from samplan.inference.input_checks import (CaseProblems, case_problems, check_folders, list_input_cases, select_part,
                                            shown_names, trained_on_2d)
from samplan.inference.model_selection import available_folds, load_model_files
from samplan.methods import get_method
from samplan.methods.base import Method, MethodPlan, PredictionContext
from samplan.models.checkpoint import load_checkpoint, plain_state_dict
from samplan.models.encoder_engine import encoder_engine, engine_and_autocast
from samplan.parallel import _call, thread_or_processes
from samplan.preprocessing.preprocessor import configuration_plan, preprocess_case, preprocess_case_files
from samplan.utils import remove_stale_temporaries

CHECKPOINT_NAMES = ("final", "best", "latest")
# finished label maps waiting to be written; more would only hold memory
_MAX_PENDING_WRITES = 2


class Predictor:
    """Segments images with one trained method/configuration, averaging the logits of its folds.

    `fold_weights` are state dicts loaded into `network` one after the other (None: use the network as
    it is, e.g. the trainer's final validation). `mirror_axes` are the spatial axes of the network input
    used for mirroring TTA (default: all of them); `tta=False` disables it. `prompt_source` (prompted methods,
    see samplan.inference.prompted): per case, a reference label map preprocessed with the image and the
    case's prompts (and the embedding cache) for the method's PredictionContext; None for every other method.
    The plans are checked by the method (`check_plan`) here, unless the caller did (`method_plan`); `plans_file`
    names them in its errors. `encoder_engine`: auto, torch or onnx (samplan.models.encoder_engine).
    """

    def __init__(
        self,
        method: Method,
        network: nn.Module,
        plans: dict[str, Any],
        configuration: str,
        dataset_json: dict[str, Any],
        fold_weights: Sequence[Mapping[str, torch.Tensor]] | None = None,
        *,
        num_input_channels: int | None = None,
        device: str | torch.device = "auto",
        tta: bool = True,
        mirror_axes: Sequence[int] | None = None,
        progress: bool = True,
        precision: str = "auto",
        prompt_source: Any = None,
        plans_file: str | Path = "plans.json",
        method_plan: MethodPlan | None = None,
        encoder_engine: str | None = None,
    ):
        self.method = method
        self.mp = method_plan or method.check_plan(plans, configuration, plans_file=plans_file)
        self.prompt_source = prompt_source
        if prompt_source is not None:  # the method's label groups and default strategy for reference prompts
            prompt_source.use_settings(method.reference_prompt_settings(self.mp))
        self.network = network
        self.plans = plans
        self.configuration = configuration
        self.plan = configuration_plan(plans, configuration)
        self.dataset_json = dataset_json
        self.label_manager = LabelManager.from_dataset_json(dataset_json)
        self.fold_weights = list(fold_weights) if fold_weights else []
        self.num_input_channels = int(num_input_channels or len(dataset_json["channel_names"]))
        self.device = resolve_device(device)
        # bf16 on CPUs that have it natively, fp16 on CUDA (see samplan.devices); fp32 for an explicit ONNX engine
        self.encoder_engine, self.autocast_dtype = engine_and_autocast(encoder_engine, self.device, precision)
        n_spatial = len(self.plan["patch_size"])
        axes = tuple(range(n_spatial)) if mirror_axes is None else tuple(int(a) for a in mirror_axes)
        self.mirror_axes = axes if tta else ()
        self.progress = progress

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        folds: Sequence[int | str] | None = None,
        checkpoint: str = "final",
        device: str | torch.device = "auto",
        tta: bool = True,
        progress: bool = True,
        precision: str = "auto",
        prompt_source: Any = None,
        encoder_engine: str | None = None,
    ) -> "Predictor":
        """Load a trained model folder; `folds` None uses every fold that has `checkpoint_<checkpoint>.pth`."""
        model_dir = Path(model_dir)
        if checkpoint not in CHECKPOINT_NAMES:
            raise SamplanError(f"unknown checkpoint {checkpoint!r}; use one of {', '.join(CHECKPOINT_NAMES)}.")
        method_name, configuration, plans, dataset_json = load_model_files(model_dir)
        method = get_method(method_name)
        mp = method.check_plan(plans, configuration, plans_file=model_dir / "plans.json")
        found = available_folds(model_dir, checkpoint)
        folds = found if folds is None else [str(f) for f in folds]
        missing = [f for f in folds if f not in found]
        if not folds or missing:
            raise InputError(
                f"{model_dir}: no checkpoint_{checkpoint}.pth for fold(s) {', '.join(missing) or '(any)'}; folds with it: "
                f"{', '.join(found) or 'none'}. Train them (samplan_train -f F), or choose -f / --checkpoint best|latest."
            )
        states = [load_checkpoint(model_dir / f"fold_{f}" / f"checkpoint_{checkpoint}.pth") for f in folds]
        first = states[0]
        for f, st in zip(folds, states):
            if (st["method"], st["configuration"]) != (method_name, configuration):
                raise InputError(
                    f"{model_dir}/fold_{f}: checkpoint is for {st['method']}/{st['configuration']}, "
                    f"but the folder is {method_name}/{configuration} (a checkpoint copied into the wrong folder?); "
                    "move it to its own model folder or re-train the fold."
                )
        label_manager = LabelManager.from_dataset_json(dataset_json)
        n_in = int(first.get("num_input_channels", len(dataset_json["channel_names"])))
        n_out = int(first.get("num_outputs", label_manager.num_outputs))
        network = method.build_network(mp, n_in, n_out)
        weights = [plain_state_dict(st["network_weights"]) for st in states]
        for f, w in zip(folds, weights):  # fail here, with the file named, if the architecture does not match
            try:  # the last fold stays loaded: a single fold is then ready, several are loaded in turn anyway
                network.load_state_dict(w)
            except RuntimeError as e:
                raise InputError(
                    f"{model_dir}/fold_{f}/checkpoint_{checkpoint}.pth does not fit the network its plans.json "
                    f"describes ({str(e).splitlines()[0].rstrip(':. ')}); it was trained with other plans or another "
                    "samplan version: re-train the fold, or use the samplan version and plans that trained it."
                ) from e
        mirror = first.get("inference_allowed_mirroring_axes", first.get("mirror_axes"))
        return cls(method, network, plans, configuration, dataset_json, weights, num_input_channels=n_in,
                   device=device, tta=tta, mirror_axes=mirror, progress=progress, precision=precision,
                   prompt_source=prompt_source, method_plan=mp, encoder_engine=encoder_engine)

    # ------------------------------------------------------------------------------------------- network

    def context(self, prompts: Any = None, reference: np.ndarray | None = None) -> PredictionContext:
        """The PredictionContext of one case: device, mirror axes, its prompts, a reference, the embedding cache."""
        cache = getattr(self.prompt_source, "embedding_cache", None)
        return PredictionContext(self.device, self.mirror_axes, prompts, reference, cache)

    def predict_logits(self, data: np.ndarray | torch.Tensor, prompts: Any = None,
                       reference: np.ndarray | None = None) -> torch.Tensor:
        """Logits `(K, z, y, x)` float32 (CPU) for one preprocessed case `(C, z, y, x)`.

        `prompts` (samplan.prompts.case_prompts.CasePrompts) and `reference` reach the method's predict_logits
        through its PredictionContext.

        With several folds the ensemble averages probabilities (not logits, so that one over-confident
        fold cannot outvote the others) and returns the logits of that mean, which export turns back
        into exactly the averaged probabilities.
        """
        data = torch.as_tensor(data, dtype=torch.float32)
        folds = self.fold_weights or [None]
        context = self.context(prompts, reference)
        total = None
        for weights in folds:
            if weights is not None:
                self.network.load_state_dict(weights)
            with autocast(self.device, self.autocast_dtype), encoder_engine(self.encoder_engine):
                logits = self.method.predict_logits(self.network, data, self.mp, context)
            if len(folds) == 1:
                return logits
            if total is None:  # in the logits' dtype: float16 for cases too large for float32 (engine.dense)
                total = torch.zeros_like(logits)
            for rows in row_slabs(logits):  # float32 temporaries of one slab, never of the whole case
                total[:, rows] += self.label_manager.logits_to_probabilities(logits[:, rows]).to(total.dtype)
            del logits
        for rows in row_slabs(total):
            mean = total[:, rows].float().div_(len(folds))
            if self.label_manager.has_regions:
                total[:, rows] = torch.logit(mean, eps=1e-6)
            else:
                total[:, rows] = torch.log(mean.clamp_min_(1e-8))
        return total

    # ------------------------------------------------------------------------------------------- in memory

    def predict_array(
        self,
        image: np.ndarray,
        spacing: Sequence[float] | None = None,
        properties: dict[str, Any] | None = None,
        return_probabilities: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Segment an in-memory image `(C, Z, Y, X)` or single-channel `(Z, Y, X)` (numpy/SimpleITK axis order).

        Give `spacing` (mm, same axis order as the array) or the `properties` of samplan.dataset.image_io.
        Returns the label map in the input's grid, `(Z, Y, X)` (dataset label values), and with
        `return_probabilities` also float16 probabilities `(K, Z, Y, X)`.
        """
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise SamplanError(f"predict_array expects (C, Z, Y, X) or (Z, Y, X), got shape {image.shape}.")
        if image.shape[0] != self.num_input_channels:
            raise SamplanError(f"image has {image.shape[0]} channel(s); the model expects {self.num_input_channels}.")
        if properties is None:
            if spacing is None or len(spacing) != 3:
                raise SamplanError("predict_array needs the spacing (3 values, array axis order) or the image properties.")
            properties = {"spacing": [float(s) for s in spacing]}
        data, _, props = preprocess_case(image, None, properties, self.plans, self.configuration)
        logits = self.predict_logits(data)
        result = logits_to_label_map(logits, props, self.plans, self.configuration, self.label_manager, return_probabilities)
        if return_probabilities:
            return result[0], result[1]
        return result

    # ------------------------------------------------------------------------------------------- files

    def output_file(self, output_dir: str | Path, case: str) -> Path:
        """Where the label map of `case` goes: `{output_dir}/{case}{file_ending}`."""
        return Path(output_dir) / f"{case}{self.dataset_json['file_ending']}"

    def is_done(self, output_dir: str | Path, case: str, save_probabilities: bool) -> bool:
        """True when `case` already has its outputs (the label map is written last, atomically)."""
        seg = self.output_file(output_dir, case)
        if not seg.is_file():
            return False
        return not save_probabilities or all((Path(output_dir) / f"{case}{s}").is_file() for s in (".npz", ".json"))

    def predict_cases(
        self,
        cases: Mapping[str, Sequence[str | Path]],
        output_dir: str | Path,
        save_probabilities: bool = False,
        overwrite: bool = True,
        num_processes: int = 0,
    ) -> list[Path]:
        """Segment every case (`{case: [channel files in order]}`) into `output_dir/{case}{file_ending}`.

        With `overwrite=False`, cases whose outputs exist are skipped (--continue). A case whose files cannot be
        predicted (wrong channels, damaged, NaN, 2D for a 3D model, ...; see samplan.inference.input_checks) is
        skipped without output, and once the others are written a CaseProblems error lists every such case.
        The next case is preprocessed in a background thread (`num_processes` 0) or in that many spawned worker
        processes, and finished cases are exported in a writer thread, both while the network works. Threads are
        the default because on 2 cores they were faster: 4 BraTS-sized cases took 5.1 s with the thread and 9.5 s
        with one worker process (spawn, imports and shipping the arrays cost more than the GIL). Returns the label
        map paths of all cases, in the order given.
        """
        output_dir = Path(output_dir)
        todo = {c: [Path(f) for f in files] for c, files in cases.items()
                if overwrite or not self.is_done(output_dir, c, save_probabilities)}
        problems: dict[str, str] = {}
        todo, references = self._check_inputs(cases, todo, problems)  # refused cases are dropped before any output
        for c in todo:  # what a killed earlier run left half-written for the cases this run writes
            for name in (self.output_file(output_dir, c).name, f"{c}.npz", f"{c}.json"):
                remove_stale_temporaries(output_dir, name)
        if not todo:
            if problems:
                raise CaseProblems(problems, len(cases), output_dir)
            return [self.output_file(output_dir, c) for c in cases]
        created = not output_dir.exists()
        output_dir.mkdir(parents=True, exist_ok=True)
        # a single case gains nothing from a worker process that must first import numpy, scipy, ...
        workers = max(int(num_processes), 0) if len(todo) > 1 else 0
        bar = tqdm(total=len(todo), desc="predicting", unit="case", disable=not self.progress or not todo,
                   dynamic_ncols=True)
        preprocessed = closing(self._preprocessed_cases(todo, references, workers, problems))  # stops workers on errors
        with preprocessed as queue, ThreadPoolExecutor(1, thread_name_prefix="samplan-export") as writer:
            writes: deque[Future] = deque()
            try:
                for case, data, ref, props in queue:
                    logits = self._predict_case(case, data, ref, props)
                    del data
                    while len(writes) >= _MAX_PENDING_WRITES:
                        writes.popleft().result()
                    writes.append(writer.submit(
                        _call, export_prediction, case,
                        (logits, props, self.plans, self.configuration, self.label_manager,
                         self.output_file(output_dir, case), save_probabilities),
                    ))
                    bar.update()
                for w in writes:
                    w.result()
                if self.prompt_source is not None:
                    self.prompt_source.record(output_dir)
            finally:
                bar.close()
        if problems:
            if created and not any(output_dir.iterdir()):
                output_dir.rmdir()  # every case was refused: leave no trace of the run
            raise CaseProblems(problems, len(cases), output_dir)
        return [self.output_file(output_dir, c) for c in cases]

    def _preprocessed_cases(self, todo: Mapping[str, Sequence[Path]], references: Mapping[str, Path | None],
                            workers: int, problems: dict[str, str],
                            ) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, dict[str, Any]]]:
        """(case, data, reference, properties) in order, the next case preprocessed (in a thread, or `workers`
        spawned processes) while the caller works on this one; pending jobs are cancelled when the caller stops.
        A case whose files are refused (DatasetError) goes into `problems` and is not yielded."""
        with thread_or_processes(workers, "samplan-preprocess") as pre:
            queue: deque[tuple[str, Future]] = deque()
            items = iter(todo.items())

            def submit_next() -> None:
                for case, files in items:
                    job = (files, references.get(case), self.plans, self.configuration)
                    queue.append((case, pre.submit(_call, preprocess_case_files, case, job)))
                    return

            for _ in range(max(workers, 1)):
                submit_next()
            try:
                while queue:
                    case, future = queue.popleft()
                    try:
                        data, ref, props = _preprocessed(case, future)
                    except DatasetError as e:
                        problems[case] = str(e)
                        data = None
                    submit_next()  # the next case is preprocessed while the network works on this one
                    if data is not None:
                        yield case, data, ref, props
            finally:
                for _, future in queue:
                    future.cancel()

    def _check_inputs(self, cases: Mapping[str, Sequence[str | Path]], todo: Mapping[str, Sequence[Path]],
                      problems: dict[str, str]) -> tuple[dict[str, Sequence[Path]], dict[str, Path | None]]:
        """Each case's files (headers only: into `problems`), prompts (a method that needs them, a prompts file naming
        only known cases) and reference label maps, before any output; returns the cases to do and their references."""
        problems.update(case_problems(todo, self.num_input_channels, trained_on_2d(self.plans)))
        todo = {c: f for c, f in todo.items() if c not in problems}
        source = self.prompt_source
        if source is None:
            needs = self.method.missing_prompts_error(self.mp) if todo else None
            if needs is not None:
                raise SamplanError(needs)
            return todo, {}
        source.check_cases(list(cases))
        try:  # a cascade's first stage predicts the cases here, before this run writes anything
            source.prepare(todo)
        except CaseProblems as e:  # the first stage refused some cases: this stage skips them too
            problems.update(e.problems)
            todo = {c: f for c, f in todo.items() if c not in problems}
        return todo, {c: source.reference_file(c) for c in todo}

    def _predict_case(self, case: str, data: np.ndarray, ref: np.ndarray | None, props: dict[str, Any]) -> torch.Tensor:
        """The logits of one preprocessed case, with its prompts and reference when the run has a prompt source."""
        prompts, reference = None, None if ref is None else ref[0]
        if self.prompt_source is not None:
            prompts = self.prompt_source.for_case(case, reference, props, data.shape, self.plans)
        # the reference label map too: a method may derive its own prompts from it (promise's ips_oracle)
        return _call(partial(self.predict_logits, prompts=prompts, reference=reference), case, (data,))

    def predict_folder(
        self,
        input_dir: str | Path,
        output_dir: str | Path,
        save_probabilities: bool = False,
        overwrite: bool = True,
        num_processes: int = 0,
        part: tuple[int, int] = (0, 1),
    ) -> list[Path]:
        """Segment every `{case}_{XXXX}{file_ending}` case of `input_dir` into `output_dir` (see predict_cases); files
        with another ending are ignored, with a note on stderr naming them. `part=(i, n)`: sorted cases i, i+n, ... only."""
        ending = self.dataset_json["file_ending"]
        check_folders(input_dir, output_dir)
        cases, ignored = list_input_cases(input_dir, ending)
        if ignored:
            print(f"note: ignoring {len(ignored)} file(s) of {input_dir} not ending in {ending} (the model's file "
                  f"ending): {shown_names(ignored)}", file=sys.stderr)
        return self.predict_cases(select_part(cases, *part), output_dir, save_probabilities, overwrite, num_processes)


def _preprocessed(case: str, future: Future) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """The result of a case's preprocessing job; a dead worker process becomes an error that says what to do."""
    try:
        return future.result()
    except BrokenProcessPool as e:
        raise SamplanError(
            f"the preprocessing worker died on case '{case}' (most often: out of memory). "
            f"Re-run with -np 0 and --continue; finished cases are kept."
        ) from e
