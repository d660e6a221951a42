"""SAM-family backbones (registry, builders, weight adaptation) and their hash-checked official weights."""
from samplan.models.backbones import (
    BACKBONES,
    BackboneSpec,
    backbone_spec,
    build_image_encoder,
    build_sam2,
    build_sam_model,
    encoder_features,
)
from samplan.models.position_embedding import adapt_patch_embed, resize_position_embeddings
from samplan.models.weights import resolve_weights, save_backbone_checkpoint

__all__ = [
    "BACKBONES", "BackboneSpec", "backbone_spec", "build_image_encoder", "build_sam2", "build_sam_model",
    "encoder_features", "adapt_patch_embed", "resize_position_embeddings", "resolve_weights", "save_backbone_checkpoint",
]
