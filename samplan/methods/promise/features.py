"""Image embeddings and APM features of cache slices, encoded once and kept in a disk cache.

The SAM inside promise is frozen, so a slice's embedding and intermediate features depend only on the slice, the
backbone, its weights, the input size, the intensity/channel mapping, the blocks read and the precision: that is
the key (samplan.methods.sam_common.embedding_cache, one `{key}.pt` per slice holding {"embedding", "features"} in
the planned dtype). Training without image augmentation then encodes each training and validation slice once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from samplan.methods.promise.network import ImageFeatures, PromiseNet, slice_input
from samplan.methods.promise.plan import WEIGHTS_BUFFER, PromiseSection
from samplan.methods.sam_common.decoding import channels_last
from samplan.methods.sam_common.embedding_cache import EmbeddingCache, autocast_name, embedding_key, weights_identity
from samplan.methods.sam_common.slice_input import encoder_input
from samplan.models.encoder_engine import prediction_encoder

FEATURE_FOLDER = "promise_features"  # beside the configuration's cache folder in the preprocessed dataset


def feature_cache_dir(cache_dir: Path) -> Path:
    """Where promise keeps slice features for a preprocessed configuration folder."""
    return Path(cache_dir).parent / FEATURE_FOLDER


def slice_key(weights_id: str, slice_data: torch.Tensor, section: PromiseSection, device: torch.device) -> str:
    """The cache key of one cache slice `(C, H, W)` for the frozen SAM of identity `weights_id`."""
    mapping = {"intensity": [r.to_dict() for r in section.intensity.per_channel],
               "channels": section.channels.rgb_from_channels, "blocks": list(section.apm.feature_blocks),
               "dtype": section.feature_cache, "precision": autocast_name(device)}
    return embedding_key(slice_data, section.backbone, weights_id, int(section.input_size), mapping)


def encode_slices(network: PromiseNet, slices: Sequence[torch.Tensor], section: PromiseSection,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode cache slices `[(C, H, W)]` (any sizes) in batches: (embeddings `(B, D, h, w)`, features `(B, F, h, w)`),
    float32 on `device`."""
    spec = slice_input(section)
    batch = max(1, int(section.encoder_batch_size))
    channels_last(network.sam.image_encoder)
    # at prediction, the Predictor's encoder engine may run this on ONNX Runtime (samplan.models.encoder_engine)
    encode = prediction_encoder(ImageFeatures(network), tag=f"promise blocks {network.blocks}",
                                weights=network.sam.image_encoder)
    embs, feats = [], []
    for s in range(0, len(slices), batch):
        x = torch.cat([encoder_input(sl[None].float(), spec)[0] for sl in slices[s:s + batch]])
        with torch.no_grad():  # as PromiseNet.encode: the SAM is frozen
            e, f = encode(x.to(device).contiguous(memory_format=torch.channels_last))
        embs.append(e)
        feats.append(f)
    return torch.cat(embs), torch.cat(feats)


class FeatureStore:
    """Embeddings and features of cache slices: read from the disk cache, the missing ones encoded and written."""

    def __init__(self, root: str | Path | None):
        self.cache = EmbeddingCache(root) if root is not None else None
        self.encoded = 0

    def get(self, network: PromiseNet, slices: Sequence[torch.Tensor], section: PromiseSection,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings `(B, D, h, w)`, features `(B, F, h, w)`) float32 on `device` for cache slices `[(C, H, W)]`."""
        if self.cache is None:
            self.encoded += len(slices)
            return encode_slices(network, slices, section, device)
        weights_id = weights_identity(network, WEIGHTS_BUFFER)  # once per batch: it may hash the whole state
        keys = [slice_key(weights_id, sl, section, device) for sl in slices]
        found: dict[int, dict[str, torch.Tensor]] = {}
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            if isinstance(hit, dict) and {"embedding", "features"} <= set(hit):
                found[i] = hit
        todo = [i for i in range(len(slices)) if i not in found]
        if todo:
            emb, feat = encode_slices(network, [slices[i] for i in todo], section, device)
            dtype = getattr(torch, section.feature_cache)
            for j, i in enumerate(todo):
                entry = {"embedding": emb[j].to(dtype), "features": feat[j].to(dtype)}
                self.cache.put(keys[i], entry)
                found[i] = entry  # the stored (rounded) values, so that a first epoch equals the later ones
            self.encoded += len(todo)
        order = range(len(slices))
        return (torch.stack([found[i]["embedding"] for i in order]).to(device, torch.float32),
                torch.stack([found[i]["features"] for i in order]).to(device, torch.float32))
