"""The Method interface: every hook the planner, the trainer and the predictor call, and the plan a method is bound to.

A method is a stateless object registered by name in `samplan.methods`. Its plan section is a typed dataclass
(`section_type`, a samplan.experiment_planning.sections.PlanSection) written by `plan_section` and parsed once by
`check_plan`, which returns a `MethodPlan`: the parsed section with the plans dict and the configuration. Every
other hook receives that `MethodPlan`, never the raw plans dict. `TrainableMethod`s also give a training recipe
and may replace the generic train/validation steps; `PromptedMethod`s have no training and segment from prompts.
Torch is imported only inside the hooks that make tensors, so planning does not load it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Mapping, Sequence, TypeVar

from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.experiment_planning.sections import PlanSection
from samplan.paths import preprocessed_root

if TYPE_CHECKING:  # only for annotations: importing torch here would slow down planning
    import torch
    from torch import nn

    from samplan.dataset.labels import LabelManager
    from samplan.prompts.case_prompts import CasePrompts, ReferencePromptSettings
    from samplan.engine.recipe import TrainingRecipe

S = TypeVar("S", bound=PlanSection)


@dataclass(frozen=True)
class MethodPlan(Generic[S]):
    """A method's parsed plan section, bound to the plans it came from and one configuration."""

    method: str
    section: S
    plans: Mapping[str, Any]
    configuration: str
    plans_file: str = "plans.json"

    @property
    def config(self) -> Mapping[str, Any]:
        """The base plan of the configuration (patch size, spacing, normalisation, ...: plans["configurations"][c])."""
        return self.plans["configurations"][self.configuration]

    @property
    def cache_dir(self) -> Path:
        """Where the configuration's preprocessed cases are (they exist only after samplan_plan_and_preprocess)."""
        data_id = self.config.get("data_identifier", self.configuration)
        return preprocessed_root() / str(self.plans.get("dataset_name", "")) / str(data_id)


@dataclass(frozen=True)
class PredictionContext:
    """What one case's prediction needs besides the network and its input.

    `mirror_axes`: spatial axes of the network input for mirroring test-time augmentation (empty: none);
    `prompts`: the case's prompts on its preprocessed grid (prompted methods); `reference`: a reference label map
    `(Z, Y, X)` on that grid, for methods validated with reference-derived prompts; `embedding_cache`: where a
    method with a frozen encoder may keep image embeddings across runs (samplan.methods.sam_common.embedding_cache).
    """

    device: "torch.device"
    mirror_axes: tuple[int, ...] = ()
    prompts: "CasePrompts | None" = None
    reference: Any = None
    embedding_cache: Any = None


class Method(ABC):
    """One segmentation method; subclasses set the class attributes and implement the abstract hooks."""

    name: ClassVar[str] = ""
    # "2d": works on slices of the transposed volume; "3d": works on 3D patches
    dimensionality: ClassVar[str] = ""
    needs_training: ClassVar[bool] = True
    section_type: ClassVar[type[PlanSection]] = PlanSection

    @abstractmethod
    def plan_section(self, fingerprint: dict[str, Any], base_plan: dict[str, Any], budget: ComputeBudget,
                     dataset_json: dict[str, Any]) -> PlanSection:
        """This method's section of plans.json, from the fingerprint and the base plan.

        `base_plan` is the plans dict without "methods" (configurations already planned; a copy, so changing it
        has no effect): a section references its configurations by name. `dataset_json` gives what the
        fingerprint does not: channel names, labels and regions.
        """

    def not_applicable(self, base_plan: dict[str, Any]) -> str | None:
        """Why this method cannot serve a dataset with this base plan (e.g. a 3D method and 2D images), else None."""
        return None

    def configurations(self, section: Any) -> list[str]:
        """Configurations this method works on, from its section (the first is the default)."""
        return list(section.configurations)

    def check_plan(self, plans: Mapping[str, Any], configuration: str | None = None, *,
                   plans_file: str | Path = "plans.json") -> MethodPlan:
        """Parse and check this method's section of `plans` and bind it to `configuration` (default: the first).

        Unknown, missing or mistyped keys, a configuration that is not planned, and whatever `check` refuses are
        a SamplanError naming the plans file: the trainer calls this before it writes anything.
        """
        raw = (plans.get("methods") or {}).get(self.name)
        if raw is None:
            raise SamplanError(f"{plans_file} has no '{self.name}' section; re-plan with samplan_plan_and_preprocess "
                               f"-m {self.name}.")
        section = self.resolve(self.section_type.from_dict(raw, f"{plans_file}: methods.{self.name}"))
        configs = self.configurations(section)
        configuration = configuration or configs[0]
        if configuration not in configs or configuration not in (plans.get("configurations") or {}):
            raise SamplanError(f"configuration {configuration!r} is not planned for {self.name}; planned: "
                               f"{', '.join(configs)}.")
        mp = MethodPlan(self.name, section, plans, configuration, str(plans_file))
        self.check(mp)
        return mp

    def resolve(self, section: Any) -> Any:
        """The section as the hooks use it (e.g. a backbone alias resolved); the plans file keeps what was written."""
        return section

    def check(self, mp: MethodPlan) -> None:
        """Raise SamplanError when the bound plan (with the CLI's overrides) cannot be used."""

    @abstractmethod
    def build_network(self, mp: MethodPlan, num_input_channels: int, num_outputs: int) -> "nn.Module":
        """The network, randomly initialised (trained weights are loaded by the caller)."""

    def initialize_pretrained(self, network: "nn.Module", mp: MethodPlan) -> str:
        """Load pretrained weights into a new network (new trainings and untrained model folders, never prediction);
        a line for the training log, "" when there is nothing to load."""
        return ""

    def predict_logits(self, network: "nn.Module", data: "torch.Tensor", mp: MethodPlan,
                       context: PredictionContext) -> "torch.Tensor":
        """Logits `(K, Z, Y, X)` (float32, CPU) for one preprocessed case `(C, Z, Y, X)`.

        The default: Gaussian-weighted sliding windows for 3D configurations, slice by slice along axis 0 for 2D
        ones, mirrored along `context.mirror_axes`.
        """
        from samplan.engine.dense import predict_dense

        return predict_dense(network, data, mp.plans, mp.configuration, mirror_axes=context.mirror_axes,
                             device=context.device)

    def missing_prompts_error(self, mp: MethodPlan) -> str | None:
        """The error to stop a prediction run with when it has no prompts but this method's model needs them."""
        return None

    def validation_prompt_strategy(self, mp: MethodPlan) -> str | None:
        """For prompted models: the reference-derived prompt strategy (samplan.prompts.case_prompts) their final
        validation predicts with, marked as an oracle in its summary; None = no prompts."""
        return None

    def reference_prompt_settings(self, mp: MethodPlan) -> "ReferencePromptSettings":
        """How this method's prompts come from reference label maps (label groups, the oracle's points/box)."""
        from samplan.prompts.case_prompts import ReferencePromptSettings

        return ReferencePromptSettings()

    def __repr__(self) -> str:
        return f"<method {self.name} ({self.dimensionality}, {'trained' if self.needs_training else 'no training'})>"


class TrainableMethod(Method):
    """A method that `samplan_train` trains: it builds a recipe, and uses the generic steps unless it overrides them."""

    needs_training: ClassVar[bool] = True

    @abstractmethod
    def training_recipe(self, mp: MethodPlan, label_manager: "LabelManager") -> "TrainingRecipe":
        """Loss, optimiser, schedule, sampling and augmentation for the bound configuration, from the section."""

    def training_loader(self, mp: MethodPlan, cache_dir: Path, case_ids: list[str], recipe: "TrainingRecipe",
                        label_manager: "LabelManager", *, train: bool, seed: int) -> Any:
        """A loader of the method's own (`epoch(e, n_batches)` yielding batches, and `close()`), or None for the
        trainer's patch loader."""
        return None

    def train_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                   optimizer: "torch.optim.Optimizer", device: "torch.device", mp: MethodPlan) -> dict[str, float]:
        """One optimiser step on `batch`; returns {"loss": float}."""
        from samplan.engine.steps import default_train_step

        return default_train_step(network, batch, recipe, optimizer, device)

    def validation_step(self, network: "nn.Module", batch: dict[str, Any], recipe: "TrainingRecipe",
                        device: "torch.device", label_manager: "LabelManager", mp: MethodPlan) -> dict[str, Any]:
        """Loss and per-class tp/fp/fn on a validation batch (for the running pseudo-Dice)."""
        from samplan.engine.steps import default_validation_step

        return default_validation_step(network, batch, recipe, device, label_manager)


class PromptedMethod(Method):
    """A method without training that segments from prompts given at prediction (a prompts file, or prompts derived
    from reference label maps). `samplan_train` writes its model folder: the pretrained weights and their identity."""

    needs_training: ClassVar[bool] = False
    needs_prompts: ClassVar[str] = "this method needs prompts: samplan_predict --prompts FILE, or --prompt-strategy " \
                                   "with --reference-dir DIR."

    def missing_prompts_error(self, mp: MethodPlan) -> str | None:
        """Always the method's `needs_prompts` message: there is no prediction without prompts."""
        return self.needs_prompts


def trainable_names(methods: Mapping[str, Method]) -> Sequence[str]:
    """Names of the trainable methods among `methods`."""
    return [n for n, m in methods.items() if isinstance(m, TrainableMethod)]
