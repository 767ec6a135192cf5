"""Helpers shared by the mask-conditioned models (TGCA, ControlNet)."""
from __future__ import annotations

import torch


def drop_whole_masks(mask: torch.Tensor, prob: float) -> torch.Tensor:
    """Zeroes each sample's whole mask with probability `prob` (condition dropout),
    which trains the all-zero null condition that classifier-free guidance uses."""
    if prob <= 0:
        return mask
    keep = torch.rand(mask.shape[0], device=mask.device) >= prob
    return mask * keep.view(-1, *([1] * (mask.dim() - 1))).to(mask.dtype)
