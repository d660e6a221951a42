"""The model archive of samplan_export_model / samplan_install_model: manifest schema, member-name rules, hashing,
and the checks an archive must pass before anything of it is written (torch-free; nothing is ever unpickled).

An archive holds, relative to the model folder `<method>__<plans>__<configuration>/`: plans.json, dataset.json,
fingerprint.json (when the model folder has it), `fold_<k>/checkpoint_<final|best>.pth` with the fold's small
json/txt files (and `fold_<k>/validation/summary.json`), and `manifest.json`, which lists every other member with its
size and sha256.
"""
from __future__ import annotations

import hashlib
import json
import re
import stat
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Mapping

from samplan.errors import InputError
from samplan.experiment_planning.plans import check_plans_version
from samplan.paths import parse_model_dir_name
from samplan.utils import MAX_JSON_BYTES

FORMAT = "samplan-model"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_LEVEL_FILES = ("plans.json", "dataset.json", "fingerprint.json")
CHECKPOINTS = ("final", "best")
FOLD_FILE_SUFFIXES = (".pth", ".json", ".txt")
# bounds against crafted archives: a 5-fold model with final and best checkpoints has ~40 members; SAM ViT-H
# checkpoints are ~2.5 GB, so 10 of them fit well under the total
MAX_MEMBERS = 1000
MAX_TOTAL_BYTES = 64 * 2**30
MAX_MANIFEST_BYTES = 4 * 2**20
# deflate cannot exceed ~1030:1; samplan's JSON compresses ~10:1 and checkpoints are stored: more is a zip bomb
MAX_RATIO = 200
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # method, plans and configuration names
_DATASET = re.compile(r"^Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_FOLD = re.compile(r"^(\d+|all)$")
FIX = "ask the sender for a new export (samplan_export_model), or download the archive again"


def copy_hashed(src: IO[bytes], dst: IO[bytes] | None = None, limit: int | None = None,
                what: str = "") -> tuple[str, int]:
    """Stream `src` into `dst` (or nowhere) and return (sha256 hex, bytes); InputError past `limit` bytes."""
    digest, n = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        n += len(chunk)
        if limit is not None and n > limit:
            raise InputError(f"{what} holds more than the {limit} bytes its manifest entry gives; {FIX}.")
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest(), n


def model_folder_name(manifest: Mapping[str, Any]) -> str:
    """The model folder name `<method>__<plans>__<configuration>` of a manifest."""
    return f"{manifest['method']}__{manifest['plans_name']}__{manifest['configuration']}"


def unsafe_member_name(name: str) -> str | None:
    """Why `name` may not be written below a folder (absolute, `..`, backslashes, ...), or None when it is safe."""
    if not name or len(name) > 255:
        return "an empty or over-long name"
    if name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return "an absolute path (or a Windows path)"
    if any(ord(c) < 32 for c in name):
        return "a control character in the name"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "a '..', '.' or empty path component"
    return None


def _allowed_member(name: str, folds: list[str], checkpoints: list[str]) -> bool:
    """True for the files an export holds: the model-level JSON files and the chosen folds' files."""
    if name in MODEL_LEVEL_FILES:
        return True
    parts = name.split("/")
    if parts[0] not in {f"fold_{f}" for f in folds} or not parts[-1].endswith(FOLD_FILE_SUFFIXES):
        return False
    if len(parts) == 3:
        return parts[1:] == ["validation", "summary.json"]
    is_checkpoint = parts[-1].endswith(".pth")
    return len(parts) == 2 and (not is_checkpoint or parts[1] in {f"checkpoint_{c}.pth" for c in checkpoints})


def _refuse(archive: Path, what: str) -> InputError:
    return InputError(f"{archive}: {what}; nothing was installed. {FIX[0].upper()}{FIX[1:]}.")


def check_manifest(manifest: Any, archive: Path) -> dict[str, Any]:
    """`manifest` if it has the expected schema; InputError naming the bad entry otherwise."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _refuse(archive, f"{MANIFEST_NAME} {what}")

    need(isinstance(manifest, dict), "is not a JSON object")
    need(manifest.get("format") == FORMAT, f"has format {manifest.get('format')!r}, not {FORMAT!r} (not a samplan model "
         "archive)")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise InputError(f"{archive}: model archive format version {version!r}, but this samplan reads version "
                         f"{FORMAT_VERSION}; install it with the samplan version that exported it (samplan "
                         f"{manifest.get('samplan_version', '?')}), or ask for an export from this one.")
    for key, pattern in (("dataset_name", _DATASET), ("method", _NAME_PART), ("plans_name", _NAME_PART),
                         ("configuration", _NAME_PART)):
        value = manifest.get(key)
        need(isinstance(value, str) and bool(pattern.match(value)) and "__" not in value,
             f"has no usable {key!r} (got {value!r})")
    need(parse_model_dir_name(model_folder_name(manifest)) is not None, "names no valid model folder")
    need(isinstance(manifest.get("samplan_version"), str), "has no 'samplan_version' string")
    valid = {"folds": lambda f: isinstance(f, str) and bool(_FOLD.match(f)), "checkpoints": CHECKPOINTS.__contains__}
    for key, ok in valid.items():
        value = manifest.get(key)
        need(isinstance(value, list) and value and all(ok(v) for v in value) and len(set(value)) == len(value),
             f"has no usable {key!r} list (got {value!r})")
    need(manifest.get("pretrained_weights") is None or isinstance(manifest["pretrained_weights"], dict),
         "has a 'pretrained_weights' entry that is neither null nor an object")
    files = manifest.get("files")
    need(isinstance(files, dict) and 0 < len(files) <= MAX_MEMBERS, f"has no 'files' object of 1..{MAX_MEMBERS} entries")
    for name, entry in files.items():
        need(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and bool(_SHA256.match(entry["sha256"]))
             and type(entry.get("size")) is int and entry["size"] >= 0,
             f"entry {name!r} lacks a lower-case hex 'sha256' or a non-negative integer 'size'")
    return manifest


def _read_manifest(zf: zipfile.ZipFile, archive: Path) -> dict[str, Any]:
    """The archive's manifest, read with a bounded size and checked against the schema."""
    try:
        info = zf.getinfo(MANIFEST_NAME)
    except KeyError:
        raise _refuse(archive, f"has no {MANIFEST_NAME} (it was not written by samplan_export_model)") from None
    if info.file_size > MAX_MANIFEST_BYTES:
        raise _refuse(archive, f"{MANIFEST_NAME} holds {info.file_size} bytes, more than the {MAX_MANIFEST_BYTES} "
                      "a samplan manifest can have")
    return check_manifest(_member_json(zf, info, archive, MAX_MANIFEST_BYTES), archive)


def _member_json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path, max_bytes: int) -> Any:
    """One member parsed as JSON, reading at most `max_bytes` (the header's size may lie)."""
    try:
        with zf.open(info) as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise _refuse(archive, f"{info.filename} holds more than {max_bytes} bytes")
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _refuse(archive, f"{info.filename} is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from e
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise _refuse(archive, f"member {info.filename} is damaged ({e})") from e


def _check_members(zf: zipfile.ZipFile, manifest: Mapping[str, Any], archive: Path) -> list[zipfile.ZipInfo]:
    """The data members (all but the manifest) after the name, type, size and listing checks."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS + 1:
        raise _refuse(archive, f"has {len(infos)} members, more than the {MAX_MEMBERS + 1} a model archive can have")
    seen: set[str] = set()
    files = manifest["files"]
    for info in infos:
        name = info.filename
        why = unsafe_member_name(name)
        if why:
            raise _refuse(archive, f"member {name!r} has {why}; samplan refuses to write it")
        if name in seen:
            raise _refuse(archive, f"member {name!r} appears more than once")
        seen.add(name)
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the writer recorded no Unix file type
        if info.is_dir() or kind not in (0, stat.S_IFREG):
            raise _refuse(archive, f"member {name!r} is a directory, symlink or special file, not a regular file")
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse(archive, f"member {name!r} is encrypted or uses a compression samplan does not write")
        if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise _refuse(archive, f"member {name!r} expands {info.file_size // max(info.compress_size, 1)}-fold "
                          "(a zip bomb?)")
        if name == MANIFEST_NAME:
            continue
        if name not in files:
            raise _refuse(archive, f"member {name!r} is not listed in {MANIFEST_NAME} (an added file)")
        if not _allowed_member(name, manifest["folds"], manifest["checkpoints"]):
            raise _refuse(archive, f"member {name!r} is not a file a model archive holds for folds "
                          f"{' '.join(manifest['folds'])} and checkpoints {' '.join(manifest['checkpoints'])}")
        if info.file_size != files[name]["size"]:
            raise _refuse(archive, f"member {name!r} holds {info.file_size} bytes but {MANIFEST_NAME} gives "
                          f"{files[name]['size']}")
    missing = sorted(set(files) - seen)
    if missing:
        raise _refuse(archive, f"member {missing[0]!r} listed in {MANIFEST_NAME} is missing"
                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    needed = ["plans.json", "dataset.json"] + [f"fold_{f}/checkpoint_{c}.pth" for f in manifest["folds"]
                                               for c in manifest["checkpoints"]]
    absent = [n for n in needed if n not in files]
    if absent:
        raise _refuse(archive, f"{MANIFEST_NAME} lists no {absent[0]!r}, which the model needs")
    total = sum(e["size"] for e in files.values())
    if total > MAX_TOTAL_BYTES:
        raise _refuse(archive, f"would expand to {total} bytes, more than the {MAX_TOTAL_BYTES} samplan installs")
    return [i for i in infos if i.filename != MANIFEST_NAME]


def check_member_hash(zf: zipfile.ZipFile, info: zipfile.ZipInfo, expected: Mapping[str, Any], archive: Path,
                      dst: IO[bytes] | None = None) -> None:
    """Stream one member (into `dst` when given); InputError naming it unless its size and sha256 match."""
    try:
        with zf.open(info) as f:
            digest, n = copy_hashed(f, dst, expected["size"], f"{archive}: member {info.filename!r}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a CRC error: bytes changed after the export
        raise _refuse(archive, f"member {info.filename!r} is damaged ({e})") from e
    if n != expected["size"] or digest != expected["sha256"]:
        raise _refuse(archive, f"member {info.filename!r} has sha256 {digest} ({n} bytes), but {MANIFEST_NAME} gives "
                      f"{expected['sha256']} ({expected['size']} bytes): it was changed or damaged after the export")


def verify_archive(zf: zipfile.ZipFile, archive: Path) -> tuple[dict[str, Any], list[zipfile.ZipInfo]]:
    """(manifest, data members) of an archive that passed every check: schema, names, listing, sizes, sha256 and
    the plans format version; InputError naming the first failing member otherwise."""
    manifest = _read_manifest(zf, archive)
    infos = _check_members(zf, manifest, archive)
    for info in infos:
        check_member_hash(zf, info, manifest["files"][info.filename], archive)
    plans, dataset_json = (_member_json(zf, zf.getinfo(n), archive, MAX_JSON_BYTES) for n in ("plans.json", "dataset.json"))
    if not isinstance(plans, dict) or not isinstance(dataset_json, dict):
        raise _refuse(archive, "plans.json or dataset.json is not a JSON object")
    try:
        check_plans_version(plans, f"{archive}:plans.json")
    except InputError as e:
        raise InputError(f"{e} Nothing was installed.") from e
    for key in ("dataset_name", "plans_name"):
        if key in plans and plans[key] != manifest[key]:
            raise _refuse(archive, f"plans.json has {key} {plans[key]!r} but {MANIFEST_NAME} gives {manifest[key]!r}")
    return manifest, infos
