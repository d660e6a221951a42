"""promise's network: a frozen segment_anything Sam, the APM (auto-prompting module) and IPS (incremental pattern
shifting); the frozen SAM's weights and their identity (the feature cache's key)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from samplan.errors import SamplanError
from samplan.methods.promise.decoder import decode_shifted
from samplan.methods.promise.plan import WEIGHTS_BUFFER, PromiseSection
from samplan.methods.sam_common.slice_input import SamInput
from samplan.methods.sam_common.plan import num_foreground
from samplan.methods.sam_common.weights import load_sam_weights, record_weights_identity
from samplan.models.backbones import build_sam_model, encoder_features
from samplan.models.specs import backbone_spec

PRESENCE_START = 2.0  # logit of the presence head at initialisation: probability 0.88
MULTIMASK_FIRST = 1  # SAM's mask tokens: 0 = single-mask output, 1..3 = the three multimask outputs


def slice_input(section: PromiseSection) -> SamInput:
    """How cache slices become the encoder's input: [0, 1], then the backbone's pixel mean/std on 0..255."""
    spec = backbone_spec(section.backbone)
    return SamInput(section.input_size, section.intensity.per_channel, section.channels.rgb_from_channels,
                    spec.pixel_mean, spec.pixel_std)


def prompt_values(section: PromiseSection) -> int:
    """Numbers the APM's linear layer regresses per foreground output: point coordinates, box corners (unless the
    box is read from the heatmap), one presence logit."""
    p = section.prompt
    points = 2 * (p.num_positive + p.num_negative) if "points" in p.output else 0
    return points + (4 if regresses_box(section) else 0) + 1


def regresses_box(section: PromiseSection) -> bool:
    """True when the linear layer regresses the box (readout "regression"); "heatmap" reads it from a map."""
    return "box" in section.prompt.output and section.apm.readout == "regression"


def soft_box(prob: torch.Tensor) -> torch.Tensor:
    """Foreground probabilities `(..., h, w)` -> the box `(..., 4)` (x0, y0, x1, y1) of their occupied rows and
    columns, in grid cells, differentiable: a column counts as occupied with its largest probability relative to the
    map's largest (so the most likely cell is always inside and a flat map gives the whole grid: whether the output
    is present at all is the presence logit's call), x0 is the expected number of empty columns before the first
    occupied one (the sum of the running products of 1 - occupancy) and x1 the grid width less the expected empty
    columns after the last."""
    prob = prob / prob.flatten(-2).amax(-1).clamp_min(1e-6)[..., None, None]
    cols, rows = prob.amax(-2), prob.amax(-1)  # (..., w), (..., h)

    def leading_empty(occupied: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(1 - occupied, -1).sum(-1)

    w, h = cols.shape[-1], rows.shape[-1]
    return torch.stack([leading_empty(cols), leading_empty(rows), w - leading_empty(cols.flip(-1)),
                        h - leading_empty(rows.flip(-1))], -1)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class APM(nn.Module):
    """Intermediate encoder features `(B, F, h, w)` -> prompt parameters `(B, K, P)` (before the sigmoid), and with
    readout "heatmap" a foreground logit map `(B, K, h, w)` per output.

    Three 3x3 convolutions to `width` channels, then torchvision's ResNet (BasicBlocks, `layers`; its stem takes
    `width` channels), global pooling and a linear layer. The linear layer starts near zero with biases that put the
    box on the whole image, positive points near the centre and negative points near the corners, so training
    starts from a sensible prompt. The heatmap is a 1x1 convolution of the three convolutions' output (the box is
    its soft extent, `soft_box`).
    """

    def __init__(self, in_channels: int, width: int, layers: list[int], section: PromiseSection, n_fg: int):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, ResNet

        self.n_fg, self.n_values = n_fg, prompt_values(section)
        self.reduce = nn.Sequential(_conv_bn_relu(in_channels, width), _conv_bn_relu(width, width),
                                    _conv_bn_relu(width, width))
        head = ResNet(BasicBlock, list(layers), num_classes=n_fg * self.n_values)
        head.conv1 = nn.Conv2d(width, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.head = head
        self.heatmap = nn.Conv2d(width, n_fg, 1) if section.apm.readout == "heatmap" else None
        with torch.no_grad():
            head.fc.weight.normal_(0.0, 1e-3)
            head.fc.bias.copy_(initial_bias(section).repeat(n_fg))
            if self.heatmap is not None:  # default weights (a readable map from the first step), no bias
                nn.init.zeros_(self.heatmap.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, F, h, w)` -> (`(B, K, P)` raw values: coordinates as logits of the input fraction, presence logit;
        the heatmap logits `(B, K, h, w)` or None)."""
        x = self.reduce(features)
        raw = self.head(x).view(features.shape[0], self.n_fg, self.n_values)
        return raw, (self.heatmap(x) if self.heatmap is not None else None)


def initial_bias(section: PromiseSection) -> torch.Tensor:
    """The APM's starting output for one foreground output: points on rings (positive inside, negative outside),
    the box on the whole image, presence PRESENCE_START (every output present: SAM's zero-shot answer to the prompt)."""
    p = section.prompt
    parts = []
    if "points" in p.output:
        for n, radius in ((p.num_positive, 0.15), (p.num_negative, 0.45)):
            angles = torch.arange(n) * (2 * math.pi / max(n, 1))
            xy = torch.stack([0.5 + radius * torch.cos(angles), 0.5 + radius * torch.sin(angles)], 1)
            parts.append(torch.logit(xy.clamp(0.02, 0.98)).reshape(-1))
    if regresses_box(section):
        parts.append(torch.logit(torch.tensor([0.02, 0.02, 0.98, 0.98])))
    parts.append(torch.full((1,), PRESENCE_START))
    return torch.cat(parts)


class IPS(nn.Module):
    """Pooled image embedding `(B, D)` -> a shift `(B, M, D)` of the decoder's M mask tokens (two-layer GELU MLP).

    The last layer starts at zero: the decoder starts as SAM's own, and the shift grows while training."""

    def __init__(self, dim: int, hidden: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """`(B, D, h, w)` image embeddings -> `(B, M, D)` mask-token shifts."""
        return self.mlp(embedding.mean(dim=(2, 3))).view(-1, self.num_tokens, self.dim)


class PromiseNet(nn.Module):
    """Frozen Sam + APM (modes apm, apm_ips) + IPS (modes apm_ips, ips_oracle).

    `encode(images)` gives the image embedding and the APM's features (no gradients: SAM is frozen);
    `forward(embedding, features, oracle=None)` gives mask logits `(B, K, 4h, 4w)` (the first multimask output),
    presence logits `(B, K)` and the prompts used (input pixels).
    """

    def __init__(self, sam: nn.Module, section: PromiseSection, n_fg: int, feature_channels: int):
        super().__init__()
        self.sam = sam
        self.blocks = list(section.apm.feature_blocks)
        self.output = section.prompt.output
        self.num_positive, self.num_negative = section.prompt.num_positive, section.prompt.num_negative
        self.input_size = int(section.input_size)
        self.n_fg = n_fg
        dim = int(sam.prompt_encoder.embed_dim)
        self.apm = (APM(feature_channels, section.apm.conv_channels, section.apm.resnet_layers, section, n_fg)
                    if section.mode != "ips_oracle" else None)
        self.ips = IPS(dim, section.ips.hidden, sam.mask_decoder.num_mask_tokens) if section.mode != "apm" else None
        self.register_buffer(WEIGHTS_BUFFER, torch.zeros(32, dtype=torch.uint8))

    def train(self, mode: bool = True) -> "PromiseNet":
        """Only the new modules switch to training mode: the frozen SAM stays in eval mode."""
        super().train(mode)
        self.sam.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input `(B, 3, S, S)` -> (embedding `(B, D, h, w)`, APM features `(B, F, h, w)`) in float32."""
        return image_features(self.sam.image_encoder, images, self.blocks)

    def regressed_prompts(self, features: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The APM's prompts per image and output (input pixels; with readout "heatmap" also its logits under
        "heatmap", for the loss) and presence logits `(B, K)`."""
        raw, heat = self.apm(features.float())
        xy = torch.sigmoid(raw[..., :-1]) * self.input_size
        prompts: dict[str, torch.Tensor] = {}
        n_pts = 2 * (self.num_positive + self.num_negative) if "points" in self.output else 0
        if n_pts:
            prompts["points"] = xy[..., :n_pts].reshape(*xy.shape[:2], -1, 2)
        if "box" in self.output:
            if heat is not None:
                prompts["heatmap"] = heat
                scale = heat.new_tensor([self.input_size / heat.shape[-1], self.input_size / heat.shape[-2]] * 2)
                c = soft_box(torch.sigmoid(heat.float())) * scale
            else:
                c = xy[..., n_pts:n_pts + 4]
            prompts["box"] = torch.stack([torch.minimum(c[..., 0], c[..., 2]), torch.minimum(c[..., 1], c[..., 3]),
                                          torch.maximum(c[..., 0], c[..., 2]), torch.maximum(c[..., 1], c[..., 3])], -1)
        return prompts, raw[..., -1]

    def forward(self, embedding: torch.Tensor, features: torch.Tensor | None,
                oracle: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Mask logits `(B, K, 4h, 4w)`, presence logits `(B, K)` (None with oracle prompts) and the prompts.

        `oracle` (mode ips_oracle): {"points": (B, K, N, 2), "labels": (B, K, N)} and/or {"box": (B, K, 4)}, input
        pixels; otherwise the APM regresses them from `features`.
        """
        b, k = embedding.shape[0], self.n_fg
        if oracle is not None:
            prompts, presence = oracle, None
        elif self.apm is None:
            raise SamplanError("this promise model (mode ips_oracle) needs reference prompts; it has no APM.")
        else:
            prompts, presence = self.regressed_prompts(features)
        pe = self.sam.prompt_encoder
        points = None
        if "points" in prompts:
            pts = prompts["points"].reshape(b * k, -1, 2)
            labels = prompts.get("labels")
            if labels is None:
                labels = torch.cat([torch.ones(self.num_positive), torch.zeros(self.num_negative)]).expand(b * k, -1)
            points = (pts, labels.reshape(b * k, -1).to(device=pts.device, dtype=torch.int64))
        boxes = prompts["box"].reshape(b * k, 4) if "box" in prompts else None
        sparse, dense = pe(points=points, boxes=boxes, masks=None)
        emb = embedding.float().repeat_interleave(k, dim=0)
        shift = self.ips(embedding.float()).repeat_interleave(k, dim=0) if self.ips is not None else None
        masks, _ = decode_shifted(self.sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense, shift)
        return masks[:, MULTIMASK_FIRST].view(b, k, *masks.shape[-2:]), presence, prompts


def feature_channels(section: PromiseSection) -> int:
    """Channels of the APM's input: the summed widths of the planned blocks' outputs (from the backbone spec)."""
    spec = backbone_spec(section.backbone)
    if spec.family == "litemedsam":
        dims = spec.extra["embed_dims"]
        # stage i's output is merged to the next stage's width (the last keeps its own)
        widths = [dims[min(i + 1, len(dims) - 1)] for i in range(len(dims))]
    else:
        widths = [spec.embed_dim] * spec.depth
    bad = [b for b in section.apm.feature_blocks if not 0 <= b < len(widths)]
    if bad:
        raise SamplanError(f"promise apm.feature_blocks {bad} out of range for {spec.name} (0..{len(widths) - 1}); "
                           "fix the plan.")
    return sum(widths[b] for b in section.apm.feature_blocks)


def build_promise(section: PromiseSection, num_outputs: int) -> PromiseNet:
    """Sam (random weights, every parameter frozen) + the new modules, sized for the plan and the outputs."""
    n_fg = num_foreground(section.regions, num_outputs)
    if len(section.prompt.label_groups) != n_fg:
        raise SamplanError(f"the promise plan has {len(section.prompt.label_groups)} label groups for {n_fg} "
                           "foreground outputs; re-plan.")
    if section.apm.readout == "heatmap" and "box" not in section.prompt.output:
        raise SamplanError(f"promise apm.readout 'heatmap' gives a box, but prompt.output is "
                           f"{section.prompt.output!r}; set apm.readout to 'regression' in the plan.")
    sam = build_sam_model(section.backbone, input_size=section.input_size).eval()
    for p in sam.parameters():
        p.requires_grad_(False)
    return PromiseNet(sam, section, n_fg, feature_channels(section))


def parameter_counts(network: PromiseNet) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in network.parameters()) - trainable


def initialize_promise(network: PromiseNet, section: PromiseSection) -> str:
    """Load the planned SAM weights into the frozen model and record their identity; a log line with both counts."""
    spec = backbone_spec(section.backbone)
    source, identity = load_sam_weights(network.sam, spec, section.checkpoint, section.input_size, (), "promise",
                                        identify=True)
    record_weights_identity(network, WEIGHTS_BUFFER, identity)
    trainable, frozen = parameter_counts(network)
    modules = [n for n in ("apm", "ips") if getattr(network, n) is not None]
    return (f"promise ({section.mode}): {spec.name} at {section.input_size} px, {source} (sha256 {identity[:12]}); "
            f"{frozen:,} SAM parameters frozen, {trainable:,} trainable ({', '.join(modules)}); prompts: "
            f"{section.prompt.output}")


def image_features(encoder: nn.Module, images: torch.Tensor, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder input `(B, 3, S, S)` -> (embedding `(B, D, h, w)`, features of `blocks` `(B, F, h, w)`) in float32."""
    neck, outs = encoder_features(encoder, images, blocks)
    grid = neck.shape[-2:]
    feats = []
    for f in outs:
        f = f.permute(0, 3, 1, 2).float()  # (B, E, H', W'), channels first
        if tuple(f.shape[-2:]) != tuple(grid):
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        feats.append(f)
    return neck.float(), torch.cat(feats, 1)


class ImageFeatures(nn.Module):
    """`PromiseNet.encode` as a module holding only the frozen image encoder (what the ONNX engine exports)."""

    def __init__(self, network: PromiseNet):
        super().__init__()
        self.encoder = network.sam.image_encoder
        self.blocks = list(network.blocks)
        self.training = self.encoder.training  # the flag only: the encoder's own mode is left alone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, 3, S, S)` -> (embedding, features), as PromiseNet.encode."""
        return image_features(self.encoder, images, self.blocks)
