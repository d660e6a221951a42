"""Sharing trained models: export a model folder as one checked zip archive, and install such an archive into
SAMPLAN_RESULTS after verifying every member (samplan.pipeline.model_archive holds the format and the checks)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import samplan
from samplan.disk_space import check_free_space, disk_full_guard
from samplan.errors import InputError, SamplanError
from samplan.inference.model_selection import available_folds, load_model_files, select_model
from samplan.locks import exclusive_lock
from samplan.paths import results_root
from samplan.pipeline.model_archive import (CHECKPOINTS, FORMAT, FORMAT_VERSION, MANIFEST_NAME, copy_hashed,
                                            check_member_hash, model_folder_name, verify_archive)
from samplan.utils import atomic_path

CHECKPOINT_CHOICES = (*CHECKPOINTS, "both")
INSTALL_LOCK = ".samplan_install.lock"
# no "__" in these names: list_trained_models must never take an unfinished install for a model folder
_INSTALLING, _REPLACED = ".install-", ".replaced-"


def pretrained_weights(plans: Mapping[str, Any], method: str) -> dict[str, Any] | None:
    """The pretrained weights the model's network started from (backbone, file, licence, source, read from the
    method's plan section and samplan.models.weights.WEIGHTS), or None when it started from random weights."""
    section = plans.get("methods", {}).get(method) or {}
    if not isinstance(section.get("backbone"), str):
        return None  # a method without a SAM backbone (unet) starts from random weights
    from samplan.methods.sam_common.weights import is_random
    from samplan.models.specs import backbone_spec
    from samplan.models.weights import WEIGHTS

    spec = backbone_spec(section["backbone"])
    checkpoint = str(section.get("checkpoint", "auto"))
    if is_random(checkpoint, spec):
        return None
    # "auto" is the table's file; a --checkpoint file named like a table file is held to that file's hash on load
    entry = (WEIGHTS.get(spec.weights) if checkpoint == "auto"
             else next((e for e in WEIGHTS.values() if e.file_name == Path(checkpoint).name), None))
    if entry is None:
        return {"backbone": spec.name, "weights": None, "file": Path(checkpoint).name, "source": None,
                "licence": "unknown: the trainer's own checkpoint file; ask who trained the model"}
    return {"backbone": spec.name, "weights": entry.name, "file": entry.file_name, "source": entry.source,
            "licence": entry.licence}


def _archive_names(model_dir: Path, folds: Sequence[str], checkpoints: Sequence[str]) -> list[str]:
    """The model folder's files an export holds, relative to it (hidden files such as locks are skipped)."""
    names = [n for n in ("plans.json", "dataset.json", "fingerprint.json") if (model_dir / n).is_file()]
    for fold in folds:
        fold_dir = model_dir / f"fold_{fold}"
        names += [f"fold_{fold}/checkpoint_{c}.pth" for c in checkpoints]
        names += [f"fold_{fold}/{p.name}" for p in sorted(fold_dir.iterdir())
                  if p.is_file() and not p.name.startswith(".") and p.suffix in (".json", ".txt")]
        if (fold_dir / "validation" / "summary.json").is_file():
            names.append(f"fold_{fold}/validation/summary.json")
    return names


def _add_file(zf: zipfile.ZipFile, path: Path, name: str) -> dict[str, Any]:
    """Copy one file into the archive, hashing the bytes as they are written (a file that changes meanwhile is
    still described truthfully); returns its manifest entry."""
    info = zipfile.ZipInfo.from_file(path, name, strict_timestamps=False)
    # torch checkpoints are zip files of float tensors that deflate barely shrinks: storing saves the CPU time
    info.compress_type = zipfile.ZIP_STORED if name.endswith(".pth") else zipfile.ZIP_DEFLATED
    with open(path, "rb") as src, zf.open(info, "w", force_zip64=path.stat().st_size > 2**30) as dst:
        digest, size = copy_hashed(src, dst)
    return {"sha256": digest, "size": size}


def export_model(output: str | os.PathLike, dataset: str | int, method: str, configuration: str | None = None,
                 folds: Sequence[int | str] | None = None, checkpoint: str = "final",
                 plans_name: str | None = None) -> dict[str, Any]:
    """Write the trained model folder that samplan_predict would choose for these arguments to the zip `output`
    (atomically); `checkpoint` is final, best or both; `folds` None takes every fold that has them. Returns the
    manifest."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise SamplanError(f"unknown checkpoint {checkpoint!r}; use one of {', '.join(CHECKPOINT_CHOICES)}.")
    output = Path(output)
    if output.is_dir():
        raise SamplanError(f"-o {output} is a folder; give the archive's file name, e.g. {output / 'model.zip'}.")
    checkpoints = list(CHECKPOINTS) if checkpoint == "both" else [checkpoint]
    model = select_model(dataset, method, configuration, plans_name, checkpoints[0])
    method_name, configuration, plans, _ = load_model_files(model.path)
    ready = [f for f in model.folds if all(f in available_folds(model.path, c) for c in checkpoints)]
    chosen = ready if folds is None else list(dict.fromkeys(str(f) for f in folds))
    missing = [f for f in chosen if f not in ready]
    if not chosen or missing:
        raise SamplanError(f"{model.path}: fold(s) {' '.join(missing) or '(any)'} lack "
                           f"{' and '.join(f'checkpoint_{c}.pth' for c in checkpoints)}; folds that have "
                           f"{'them' if len(checkpoints) > 1 else 'it'}: {' '.join(ready) or 'none'}. Choose -f / "
                           "--checkpoint accordingly, or train the folds first.")
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "samplan_version": samplan.__version__,
        "dataset_name": model.dataset_name, "method": method_name, "plans_name": model.plans_name,
        "configuration": configuration, "folds": chosen, "checkpoints": checkpoints,
        "pretrained_weights": pretrained_weights(plans, method_name), "files": {},
    }
    with atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for name in _archive_names(model.path, chosen, checkpoints):
                manifest["files"][name] = _add_file(zf, model.path / name, name)
            zf.writestr(MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    return manifest


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder at or above `path` that exists (where free space can be measured)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _extract(zf: zipfile.ZipFile, manifest: Mapping[str, Any], infos: list[zipfile.ZipInfo], archive: Path,
             folder: Path) -> Path:
    """Extract the verified members into a new hidden folder inside `folder`, hashing them again as they are
    written (the archive could change after the verification); returns that folder."""
    tmp = folder / f"{_INSTALLING}{os.getpid()}-{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        with disk_full_guard(folder, detail=f" while installing {archive.name}; nothing was installed"):
            for info in infos:  # names passed unsafe_member_name: no absolute paths, no '..'
                dest = tmp / info.filename
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "xb") as out:
                    check_member_hash(zf, info, manifest["files"][info.filename], archive, out)
            # the manifest stays with the model: where it came from and the licence of its pretrained weights
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename `tmp` to `target`; the old `target` (only with `overwrite`) is removed once the new one is in place."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        return
    if not overwrite:
        raise InputError(f"{target} appeared while the archive was installed; nothing was installed. Pass "
                         "--overwrite to replace it.")
    old = target.parent / f"{_REPLACED}{os.getpid()}-{secrets.token_hex(4)}.tmp"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def install_model(archive: str | os.PathLike, overwrite: bool = False) -> tuple[dict[str, Any], Path]:
    """Verify a model archive completely, then install it as SAMPLAN_RESULTS/<dataset>/<model folder>; returns
    (manifest, model folder). InputError naming the member and the fix, with nothing written, when a check fails."""
    archive = Path(archive)
    if not archive.is_file():
        raise InputError(f"{archive} does not exist or is not a file; give the .zip written by samplan_export_model.")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as e:
        raise InputError(f"{archive} is not a zip archive ({e}); give the .zip written by samplan_export_model, or "
                         "download it again if it was cut short. Nothing was installed.") from e
    with zf:
        manifest, infos = verify_archive(zf, archive)
        target = results_root() / manifest["dataset_name"] / model_folder_name(manifest)
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise InputError(f"{target} exists already; pass --overwrite to replace it (or move it away first). "
                             "Nothing was installed.")
        check_free_space(_existing_ancestor(target.parent), sum(e["size"] for e in manifest["files"].values()),
                         f"installing {archive.name}")
        created = not target.parent.exists()
        try:
            with exclusive_lock(target.parent / INSTALL_LOCK, f"installing a model into {target.parent}"):
                # under the lock no other install runs here: hidden folders of earlier ones were left by killed runs
                for stale in [*target.parent.glob(f"{_INSTALLING}*.tmp"), *target.parent.glob(f"{_REPLACED}*.tmp")]:
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = _extract(zf, manifest, infos, archive, target.parent)
                try:
                    _move_into_place(tmp, target, overwrite)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if created:  # a failed first install into a new dataset folder leaves no empty folder behind
                try:
                    target.parent.rmdir()
                except OSError:
                    pass
    return manifest, target
