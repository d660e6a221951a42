"""SAM2 (Hiera) models through sam2.build_sam.build_sam2 with hydra overrides; build and load only.

sam2's own loader would read the checkpoint unchecked, so the model is always built random
(ckpt_path=None) and the checkpoint goes through samplan.models.weights (sha256, weights_only) first.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from samplan.errors import SamplanError
from samplan.models.specs import BackboneSpec
from samplan.models.weights import load_backbone_state, load_strict


def sam2_overrides(spec: BackboneSpec, input_size: int | None) -> list[str]:
    """Hydra overrides for `spec` (its tiny overrides) with the image size replaced by `input_size` when given."""
    overrides = list(spec.extra.get("overrides", []))
    if input_size is not None:
        if input_size % 32:
            raise SamplanError(f"SAM2 input size must be a multiple of 32 (Hiera stride x stage pooling), got {input_size}")
        overrides = [o for o in overrides if not o.startswith("++model.image_size=")]
        overrides.append(f"++model.image_size={int(input_size)}")
    return overrides


def build_sam2_model(spec: BackboneSpec, *, input_size: int | None = None, checkpoint: Path | str | None = None,
                     sha256: str | None = None) -> nn.Module:
    """Build SAM2Base for a sam2-family spec on the CPU in train mode; load a hash-checked checkpoint when given."""
    if spec.family != "sam2":
        raise SamplanError(f"'{spec.name}' is not a SAM2 backbone; build it with build_sam_model")
    try:
        from sam2.build_sam import build_sam2 as _build
    except ImportError as e:
        raise SamplanError("SAM2 backbones need the sam2 package: SAM2_BUILD_CUDA=0 pip install sam2") from e
    overrides = sam2_overrides(spec, input_size)
    state = None
    if checkpoint is not None:  # checked before building, so a bad file fails fast
        state = load_backbone_state(spec, checkpoint, sha256=sha256, part="model")
    # apply_postprocessing only adds inference-time mask-selection settings; keep the defaults
    model = _build(spec.extra["config"], ckpt_path=None, device="cpu", mode="train", hydra_overrides_extra=overrides)
    if state is not None:
        load_strict(model, state, spec.name, checkpoint)
    return model.train()
