"""promise's prediction: every slice of a case through the frozen SAM, the APM (or oracle prompts from a reference)
and the decoder with IPS, gated by the presence logits, then the planned morphological opening.

Outputs `(K, Z, Y, X)`: label datasets get channel 0 = background = constant 0 and one mask-logit channel per label
(argmax = the label with the largest positive logit, else background); regions one logit channel per region.
No human prompt is needed in modes apm and apm_ips; ips_oracle reads the reference label map (an oracle).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from samplan.errors import SamplanError
from samplan.methods.promise.features import FeatureStore
from samplan.methods.promise.network import PromiseNet
from samplan.methods.promise.plan import PromiseSection
from samplan.methods.promise.train import label_masks, oracle_prompts
from samplan.methods.sam_common.slice_input import logits_to_slice, longest_side_shape

ABSENT_LOGIT = -20.0  # outputs judged absent in a slice, and pixels the opening removed
NEEDS_REFERENCE = ("this promise model was trained in mode ips_oracle, which samples its points from the reference "
                   "mask: samplan_predict --prompt-strategy oracle --reference-dir DIR (an oracle); modes apm and "
                   "apm_ips need no prompts.")


def opening(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Binary opening of a 2D mask with a `kernel` x `kernel` square (scipy.ndimage); kernel <= 1: unchanged."""
    if kernel <= 1 or not mask.any():
        return mask
    return ndimage.binary_opening(mask, structure=np.ones((kernel, kernel), bool))


def predict_case(network: PromiseNet, data: torch.Tensor, section: PromiseSection, device: torch.device, *,
                 reference: np.ndarray | None = None, cache_root: Any = None) -> torch.Tensor:
    """Logits `(K, Z, Y, X)` float32 CPU of a preprocessed case `(C, Z, Y, X)`."""
    if section.mode == "ips_oracle" and reference is None:
        raise SamplanError(NEEDS_REFERENCE)
    network.eval()
    ref = None if reference is None else np.asarray(reference)
    ref = ref[0] if ref is not None and ref.ndim == 4 else ref  # (Z, Y, X)
    _, z, h, w = data.shape
    k = network.n_fg
    size = int(section.input_size)
    valid = longest_side_shape(h, w, size)
    out = torch.full((k + (0 if section.regions else 1), z, h, w), ABSENT_LOGIT)
    first = 0 if section.regions else 1
    if not section.regions:
        out[0] = 0
    store = FeatureStore(cache_root)
    batch = max(1, int(section.encoder_batch_size))
    rng = np.random.default_rng(0)  # oracle points: the same for every run
    for s in range(0, z, batch):
        idx = list(range(s, min(z, s + batch)))
        with torch.no_grad():
            emb, feats = store.get(network, [data[:, i] for i in idx], section, device)
            oracle = None
            if section.mode == "ips_oracle":
                ref_masks = torch.stack([label_masks(ref[z], section) for z in idx])
                oracle = {n: v.to(device) for n, v in oracle_prompts(ref_masks, section, rng).items()}
            masks, presence, _ = network(emb, feats, oracle)
            if presence is None:
                presence = torch.where(ref_masks.flatten(2).amax(-1) > 0, 1.0, -1.0)
            logits = logits_to_slice(masks.float(), size, valid, (h, w)).cpu()  # (B, K, H, W)
        present = (presence > 0).cpu()
        for j, zi in enumerate(idx):
            for c in range(k):
                if not present[j, c]:
                    continue
                lo = logits[j, c]
                keep = opening(lo.numpy() > 0, int(section.postprocessing.opening_kernel_px))
                out[first + c, zi] = torch.where(torch.from_numpy(keep) | (lo <= 0), lo, torch.tensor(ABSENT_LOGIT))
    return out
