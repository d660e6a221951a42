"""Networks and SAM-family backbones: the torch-free spec table (specs), builders (backbones, sam2_builder,
litemedsam), weight adaptation (position_embedding), hash-checked official weights (weights), the UNETR decoder
and samplan's checkpoint files (checkpoint). Nothing is imported here, so `samplan.models.specs` stays torch-free."""
