"""One interface over the two SAM model families the branch can use, called as torch modules (gradients flow).

- segment-anything `Sam` (SAM ViT, MedSAM, LiteMedSAM): images resized so the longer side is S, padded at the
  bottom/right (ResizeLongestSide); boxes and points through its prompt encoder.
- sam2 `SAM2Base` (SAM2.1 Hiera): images resized to S x S (SAM2Transforms), the no-memory embedding added to the
  lowest-resolution features and the two high-resolution levels passed to the mask decoder, boxes as two corner
  points labelled 2 and 3 (as SAM2ImagePredictor does).

Images reach `prepare` as `(N, 3, H, W)` in [0, 1]; prompts are `(x, y)` slice pixels, scaled by `geometry`.
Every prompt row has its own image (embedding rows are gathered, never repeated), so many slices and outputs are
decoded in one call. Masks are the single-mask output, as low-resolution logits brought back to `(H, W)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samplan.methods.sam_common.slice_input import longest_side_shape, resize_longest_side
from samplan.models.specs import BackboneSpec, channel_pixel_statistics


@dataclass(frozen=True)
class Geometry:
    """How a slice `(H, W)` sits on the encoder input: pixel scales (x, y), the valid input part and grid part."""

    scale_x: float
    scale_y: float
    valid: tuple[int, int]
    grid_valid: tuple[int, int]


class SamAdapter(nn.Module):
    """Common base: `model`, input size S, embedding grid g, and the pixel statistics the encoder expects."""

    parts: dict[str, str] = {}

    def __init__(self, model: nn.Module, spec: BackboneSpec, input_size: int, grid: int):
        super().__init__()
        self.model = model
        self.input_size, self.grid = int(input_size), int(grid)
        self.unit_input = spec.unit_input
        self.register_buffer("pixel_mean", torch.tensor(channel_pixel_statistics(spec.pixel_mean, 3)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(channel_pixel_statistics(spec.pixel_std, 3)).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def embed_dim(self) -> int:
        """Channels of the image embedding (the prompt embedding width, 256 for real models)."""
        return int(self.part("prompt_encoder").embed_dim)

    def part(self, name: str) -> nn.Module:
        """The module of a SAM part: "image_encoder", "prompt_encoder" or "mask_decoder"."""
        return getattr(self.model, self.parts[name])

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the encoder's pixel statistics."""
        return x if self.unit_input else (x * 255.0 - self.pixel_mean) / self.pixel_std

    def _points(self, points: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None,
                geometry: Geometry) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        scale = torch.tensor([geometry.scale_x, geometry.scale_y], device=self.pixel_mean.device)
        pts = None if points is None else points * scale
        box = None if boxes is None else boxes * scale.repeat(2)
        return pts, labels, box

    def logits_to_slice(self, logits: torch.Tensor, geometry: Geometry, out_hw: tuple[int, int]) -> torch.Tensor:
        """Low-resolution logits `(R, 1, h, w)` -> `(R, 1, H, W)` on the slice."""
        s = self.input_size
        y = F.interpolate(logits.float(), (s, s), mode="bilinear", align_corners=False)
        y = y[..., : geometry.valid[0], : geometry.valid[1]]
        return F.interpolate(y, size=tuple(out_hw), mode="bilinear", align_corners=False)


class SegmentAnythingAdapter(SamAdapter):
    """segment-anything's Sam (ViT or TinyViT encoder)."""

    parts = {"image_encoder": "image_encoder", "prompt_encoder": "prompt_encoder", "mask_decoder": "mask_decoder"}

    def geometry(self, h: int, w: int) -> Geometry:
        """Longest side to S, padded: one scale for both axes."""
        hh, ww = longest_side_shape(h, w, self.input_size)
        s = self.input_size / max(h, w)
        g = self.grid / self.input_size
        return Geometry(s, s, (hh, ww), (max(1, round(hh * g)), max(1, round(ww * g))))

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` in [0, 1] -> the encoder input `(N, 3, S, S)`."""
        x = self.normalise(resize_longest_side(rgb, self.input_size))
        return F.pad(x, (0, self.input_size - x.shape[-1], 0, self.input_size - x.shape[-2]))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder input -> (image embedding `(N, D, g, g)`, no extra features)."""
        return self.model.image_encoder(x), []

    def decode(self, embeddings: torch.Tensor, extras: list[torch.Tensor], points: torch.Tensor | None,
               labels: torch.Tensor | None, boxes: torch.Tensor | None, geometry: Geometry) -> torch.Tensor:
        """Single-mask low-resolution logits `(R, 1, 4g, 4g)` of R prompt rows, each with its own embedding row."""
        pts, labels, box = self._points(points, labels, boxes, geometry)
        pe = self.model.prompt_encoder
        sparse, dense = pe(points=None if pts is None else (pts, labels), boxes=box, masks=None)
        # a zero image embedding plus "embedding + dense prompt" pairs every row with its own image
        zero = embeddings.new_zeros((1, *embeddings.shape[1:]))
        logits, _ = self.model.mask_decoder(image_embeddings=zero, image_pe=pe.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=embeddings + dense,
                                            multimask_output=False)
        return logits


class SAM2Adapter(SamAdapter):
    """sam2's SAM2Base used as an image model (no memory)."""

    parts = {"image_encoder": "image_encoder", "prompt_encoder": "sam_prompt_encoder",
             "mask_decoder": "sam_mask_decoder"}

    def geometry(self, h: int, w: int) -> Geometry:
        """Stretched to S x S: a scale per axis, the whole input valid."""
        s = self.input_size
        return Geometry(s / w, s / h, (s, s), (self.grid, self.grid))

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` in [0, 1] -> `(N, 3, S, S)` (SAM2Transforms: a plain resize, then ImageNet statistics)."""
        s = self.input_size
        shrink = rgb.shape[-2] > s or rgb.shape[-1] > s
        return self.normalise(F.interpolate(rgb, (s, s), mode="bilinear", align_corners=False, antialias=shrink))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder input -> (image embedding `(N, D, g, g)`, the high-resolution levels for the decoder)."""
        m = self.model
        _, feats, _, sizes = m._prepare_backbone_features(m.forward_image(x))
        if m.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + m.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(x.shape[0], -1, *size) for f, size in zip(feats, sizes)]
        return maps[-1], maps[:-1]

    def decode(self, embeddings: torch.Tensor, extras: list[torch.Tensor], points: torch.Tensor | None,
               labels: torch.Tensor | None, boxes: torch.Tensor | None, geometry: Geometry) -> torch.Tensor:
        """Single-mask low-resolution logits `(R, 1, 4g, 4g)` of R prompt rows, each with its own embedding row."""
        pts, labels, box = self._points(points, labels, boxes, geometry)
        if box is not None:  # SAM2ImagePredictor's box: two corner points labelled 2 and 3
            corners = box.reshape(-1, 2, 2)
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int64, device=box.device).expand(len(box), -1)
            pts = corners if pts is None else torch.cat([corners, pts], 1)
            labels = corner_labels if labels is None else torch.cat([corner_labels, labels], 1)
        pe = self.model.sam_prompt_encoder
        sparse, dense = pe(points=(pts, labels), boxes=None, masks=None)
        out = self.model.sam_mask_decoder(image_embeddings=embeddings, image_pe=pe.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False, repeat_image=False, high_res_features=extras)
        return out[0]


def build_adapter(spec: BackboneSpec, input_size: int) -> SamAdapter:
    """The backbone with random weights (every parameter frozen), wrapped in its family's adapter."""
    if spec.family == "sam2":
        from samplan.models.backbones import build_sam2

        model = build_sam2(spec.name, input_size=input_size)
        adapter: SamAdapter = SAM2Adapter(model, spec, input_size, input_size // 16)
    else:
        from samplan.models.backbones import build_sam_model

        model = build_sam_model(spec.name, input_size=input_size)
        grid = 64 if spec.family == "litemedsam" else input_size // spec.patch_size
        adapter = SegmentAnythingAdapter(model, spec, input_size, grid)
    for p in model.parameters():
        p.requires_grad_(False)
    return adapter


def load_adapter_weights(adapter: SamAdapter, spec: BackboneSpec, checkpoint: str, input_size: int) -> str:
    """The planned weights into the adapter's model ("auto", a file, or "none" = random); a line for the log."""
    from samplan.methods.sam_common.weights import is_random, load_sam_weights
    from samplan.models import weights as model_weights

    if spec.family != "sam2":
        source, sha = load_sam_weights(adapter.model, spec, checkpoint, input_size, (), "autosam2", identify=True)
        return source if is_random(checkpoint, spec) else f"{source} (sha256 {sha[:12]})"
    if is_random(checkpoint, spec):
        return "random weights" + (" (no official weights for this backbone)" if checkpoint == "auto" else "")
    path = model_weights.resolve_weights(spec.weights, None) if checkpoint == "auto" else Path(checkpoint).expanduser()
    state = model_weights.load_backbone_state(spec, path, part="model")
    model_weights.load_strict(adapter.model, state, spec.name, path)
    return f"weights from {path} (sha256 {model_weights.sha256_file(path)[:12]})"
