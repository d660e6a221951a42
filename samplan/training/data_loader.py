"""Training and validation batches from the preprocessed cache: patch sampling, augmentation, background workers.

Batch i of epoch e is a pure function of (seed, e, i, train/val): its cases come from a generator seeded with
those numbers, and sample j's patch location and every random draw of its augmentation from one seeded with
(seed, e, i, train/val, j), so the batches are identical whatever the number of worker processes, resuming at
epoch e repeats them exactly, and the ranks of a data-parallel run build disjoint parts of the very batch one
process would build (`rank`/`world_size`).

Memory stays bounded: cases are opened lazily (blosc2 handles decompress only the patch), and each
process keeps at most `HANDLE_CACHE_SIZE` open cases with their foreground locations.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from samplan.dataset.labels import LabelManager
from samplan.errors import SamplanError
from samplan.preprocessing.cache import case_paths, open_case
from samplan.engine.data_parallel import shard
from samplan.engine.augmentation import (augmentation_params, build_train_transforms, build_val_transforms,
                                           initial_patch_size)
from samplan.engine.recipe import TrainingRecipe
from samplan.training.sampling import (compact_class_locations, crop_and_pad, pick_annotated_voxel,
                                       pick_foreground_voxel, sample_patch_corner)

HANDLE_CACHE_SIZE = 64


@dataclass(frozen=True)
class LoaderSpec:
    """Plain, picklable description of what a batch is (sent to spawned workers instead of the recipe)."""

    cache_dir: str
    case_ids: tuple[str, ...]
    batch_size: int
    patch_size: tuple[int, ...]          # final patch, (Z, Y, X) or (Y, X)
    sample_size: tuple[int, ...]         # patch read from the cache (the initial patch when training)
    oversample_foreground: float
    label_manager: LabelManager
    train: bool
    seed: int
    deep_supervision_scales: tuple[tuple[float, ...], ...] | None
    augmentation: tuple[tuple[str, Any], ...]  # build_train_transforms keyword arguments
    rank: int = 0                        # this process builds samples shard(batch_size, rank, world_size) of a batch
    world_size: int = 1


def loader_spec(cache_dir: Path, case_ids: Sequence[str], recipe: TrainingRecipe, label_manager: LabelManager,
                *, train: bool, seed: int, rank: int = 0, world_size: int = 1) -> LoaderSpec:
    """The batch description for a recipe; training fills missing augmentation settings with nnU-Net's defaults."""
    patch = tuple(int(p) for p in recipe.patch_size)
    aug: dict[str, Any] = {}
    if train:
        given = dict(recipe.augmentation)
        aug = {**augmentation_params(patch), **given}
        if "initial_patch_size" not in given:  # size it for the rotation actually used
            aug["initial_patch_size"] = initial_patch_size(patch, aug["rotation_for_DA"])
            if aug["do_dummy_2d_data_aug"]:
                aug["initial_patch_size"][0] = patch[0]
    sample = tuple(int(p) for p in aug["initial_patch_size"]) if train else patch
    ds = recipe.deep_supervision_scales
    return LoaderSpec(
        cache_dir=str(cache_dir), case_ids=tuple(case_ids), batch_size=int(recipe.batch_size), patch_size=patch,
        sample_size=sample, oversample_foreground=float(recipe.oversample_foreground), label_manager=label_manager,
        train=train, seed=int(seed), deep_supervision_scales=None if ds is None else tuple(tuple(map(float, s)) for s in ds),
        augmentation=tuple(aug.items()), rank=int(rank), world_size=int(world_size))


class _CaseCache:
    """Open cases of this process (LRU): lazy arrays and compact foreground locations, never the voxels."""

    def __init__(self, folder: str, size: int | None = None):
        self.folder, self.size = folder, HANDLE_CACHE_SIZE if size is None else size
        self._cases: OrderedDict[str, tuple[Any, Any, dict[str, np.ndarray]]] = OrderedDict()

    def get(self, case: str) -> tuple[Any, Any, dict[str, np.ndarray]]:
        if case in self._cases:
            self._cases.move_to_end(case)
            return self._cases[case]
        try:
            data, seg, props = open_case(self.folder, case)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise SamplanError(f"cannot read cached case {case!r} in {self.folder} ({e}); "
                               f"re-run samplan_plan_and_preprocess for this dataset") from None
        if seg is None:
            raise SamplanError(f"cached case {case!r} in {self.folder} has no segmentation; training needs labels")
        entry = (data, seg, compact_class_locations(props.get("class_locations", {})))
        self._cases[case] = entry
        if len(self._cases) > self.size:
            self._cases.popitem(last=False)
        return entry


class BatchBuilder:
    """Builds batch (epoch, index) of a LoaderSpec; one per process, transforms and open cases created lazily."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self._cases: _CaseCache | None = None
        self._transforms = None

    def __getstate__(self) -> dict:  # workers get the spec only and open their own cases
        return {"spec": self.spec, "_cases": None, "_transforms": None}

    def _setup(self) -> None:
        s = self.spec
        self._cases = _CaseCache(s.cache_dir)
        ds = [list(x) for x in s.deep_supervision_scales] if s.deep_supervision_scales is not None else None
        if s.train:
            self._transforms = build_train_transforms(patch_size=s.patch_size, deep_supervision_scales=ds,
                                                      label_manager=s.label_manager, **dict(s.augmentation))
        else:
            self._transforms = build_val_transforms(ds, s.label_manager)

    def _sample(self, case: str, force_fg: bool, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One patch `(C, *sample_size)` float32 and its label map `(1, *sample_size)` int16, before augmentation."""
        s = self.spec
        data, seg, locations = self._cases.get(case)
        size3d = (1, *s.sample_size) if len(s.sample_size) == 2 else s.sample_size
        final3d = (1, *s.patch_size) if len(s.patch_size) == 2 else s.patch_size
        need_to_pad = [a - b for a, b in zip(size3d, final3d)]
        if force_fg:
            centre = pick_foreground_voxel(locations, rng)
        elif s.label_manager.ignore_label is not None:
            centre = pick_annotated_voxel(locations, rng)  # avoid patches with nothing annotated
        else:
            centre = None
        corner = sample_patch_corner(data.shape[1:], size3d, need_to_pad, rng, centre)
        img = crop_and_pad(data, corner, size3d, 0.0, np.float32)
        lab = crop_and_pad(seg, corner, size3d, -1, np.int16)
        if len(s.sample_size) == 2:  # one slice: drop the length-1 axis 0
            img, lab = img[:, 0], lab[:, 0]
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(np.ascontiguousarray(lab))

    def build(self, epoch: int, index: int) -> dict[str, Any]:
        """Batch `index` of `epoch`: {"data": (B, C, *patch) float32, "target": tensor or list, "keys": [case ids]}."""
        if self._cases is None:
            self._setup()
        s = self.spec
        batch_seed = [s.seed, int(epoch), int(index), int(s.train)]
        picks = np.random.default_rng(np.random.SeedSequence(batch_seed).generate_state(1)[0]).integers(
            len(s.case_ids), size=s.batch_size)
        n_random = round(s.batch_size * (1 - s.oversample_foreground))  # nnU-Net: the last samples are foreground
        mine = shard(s.batch_size, s.rank, s.world_size)
        np_state, torch_state, threads = np.random.get_state(), torch.get_rng_state(), torch.get_num_threads()
        # batchgeneratorsv2 draws from the global generators; one thread keeps float results identical everywhere
        torch.set_num_threads(1)
        try:
            images, targets = [], []
            with torch.no_grad():
                for j in mine:
                    seeds = np.random.SeedSequence([*batch_seed, j]).generate_state(3)
                    np.random.seed(int(seeds[1]))
                    torch.manual_seed(int(seeds[2]))
                    img, lab = self._sample(s.case_ids[picks[j]], j >= n_random, np.random.default_rng(seeds[0]))
                    out = self._transforms(image=img, segmentation=lab)
                    images.append(out["image"])
                    targets.append(out["segmentation"])
        finally:
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
            torch.set_num_threads(threads)
        if isinstance(targets[0], list):
            target: Any = [torch.stack([t[k] for t in targets]) for k in range(len(targets[0]))]
        else:
            target = torch.stack(targets)
        return {"data": torch.stack(images).float(), "target": target, "keys": [s.case_ids[picks[j]] for j in mine]}


class _EpochBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item (epoch, i) is batch i of that epoch."""

    def __init__(self, builder: BatchBuilder):
        self.builder = builder

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.builder.build(*key)


class _EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, 0..n_batches-1); the loader sets epoch and count before each pass (works with persistent workers)."""

    def __init__(self) -> None:
        self.epoch, self.n_batches = 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in range(self.n_batches)])

    def __len__(self) -> int:
        return self.n_batches


def _worker_init(worker_id: int) -> None:
    """Workers run one thread each: the processes, not threads inside them, share the cores."""
    torch.set_num_threads(1)


class PatchLoader:
    """Batches of patches for training (augmented, initial patch cropped back) or validation (no augmentation).

    `recipe.patch_size` of length 2 samples slices along axis 0 of the cached (transposed) volume; length 3
    samples 3D patches. Each batch is {"data": float32 (B, C, *patch), "target": int64 (B, 1, *patch) class
    indices or float32 (B, R, *patch) regions (a list of those, full resolution first, with
    `recipe.deep_supervision_scales`), "keys": [case ids]}. `num_workers` > 0 builds batches in that many spawned
    background processes (kept alive across epochs); 0 builds them in this process. With `world_size` > 1 each
    batch holds only rank `rank`'s share of the global batch of `recipe.batch_size`.
    """

    def __init__(self, cache_dir: Path, case_ids: list[str], recipe: TrainingRecipe, label_manager: LabelManager,
                 *, train: bool, seed: int, num_workers: int, rank: int = 0, world_size: int = 1):
        cache_dir = Path(cache_dir)
        if not case_ids:
            raise SamplanError(f"no cases to load from {cache_dir}")
        missing = [c for c in case_ids if not case_paths(cache_dir, c)["properties"].is_file()]
        if missing:
            raise SamplanError(f"{len(missing)} case(s) are not in the preprocessed cache {cache_dir} "
                               f"(e.g. {', '.join(missing[:5])}); re-run samplan_plan_and_preprocess")
        self.spec = loader_spec(cache_dir, case_ids, recipe, label_manager, train=train, seed=seed, rank=rank,
                                world_size=world_size)
        self.num_workers = max(0, int(num_workers))
        self._builder = BatchBuilder(self.spec)
        self._sampler = _EpochSampler()
        self._loader: torch.utils.data.DataLoader | None = None

    def _dataloader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _EpochBatches(self._builder), batch_size=None, sampler=self._sampler, num_workers=self.num_workers,
                multiprocessing_context="spawn", persistent_workers=True, worker_init_fn=_worker_init,
                prefetch_factor=2, generator=torch.Generator())  # own generator: the trainer's torch RNG stays untouched
        return self._loader

    def epoch(self, e: int, n_batches: int) -> Iterator[dict[str, Any]]:
        """Exactly `n_batches` batches of epoch `e`, the same ones for any number of workers."""
        if self.num_workers == 0:
            for i in range(n_batches):
                yield self._builder.build(e, i)
            return
        self._sampler.epoch, self._sampler.n_batches = int(e), int(n_batches)
        yield from self._dataloader()

    def close(self) -> None:
        """Stop the background workers (they also stop when the loader is garbage collected)."""
        if self._loader is not None:
            it = getattr(self._loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            self._loader = None

    def __enter__(self) -> "PatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
