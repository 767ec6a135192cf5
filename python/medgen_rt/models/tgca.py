"""TGCA, the timestep-gated control adapter (VolDiT): mask-conditioned
generation on top of a frozen DiT3D.

mask (B, K, D, H, W) at image resolution, K = 1 (a label map scaled to [0, 1])
or one channel per structure  ->  mask encoder (8, 16, 32, 64, 128 channels,
four stride-2 convs by default, zero-initialised output conv to the hidden size)  ->
resized to the token grid  ->  one control token per patch, times a per-sample
gate sigmoid(Linear(t_emb)) and a per-layer learnable scale (0.1)  ->  added to
the modulated attention input of the chosen blocks.

Differences from the published code, on purpose:
* No LayerNorm on the control tokens: in the published block a LayerNorm after
  gate and scale divides both out again, so neither can act. Here they do.
* Condition dropout per sample (whole mask zeroed) rather than per batch, so
  every batch trains both the conditional and the null branch for guidance.
* The adapter starts closed in effect: the zero-initialised output conv makes
  the control exactly zero, so the model starts as the base model. The gate's
  Linear is zero-initialised as published (gate 0.5): closing the gate as well
  would leave both factors zero and nothing could learn.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from medgen_rt.models.conditioning import drop_whole_masks
from medgen_rt.models.dit import DiT

ENCODER_CHANNELS = (8, 16, 32, 64, 128)


class MaskEncoder(nn.Module):
    """Conditioning embedder: (B, K, D, H, W) -> (B, hidden, D/s, H/s, W/s), s = 2^(len(channels) - 1)."""

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = ENCODER_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv3d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv3d(c_in, c_out, 3, stride=2, padding=1))
        self.conv_out = nn.Conv3d(channels[-1], out_channels, 3, padding=1)
        # He initialisation: with PyTorch's default the activations of a sparse one-hot map shrink
        # about 3x per convolution, the embedder's output was ~3e-4 after seven of them, and a
        # freshly trained adapter left the samples unchanged (output difference with and without
        # the map ~4e-7 after 250 steps)
        for conv in [self.conv_in, *self.blocks]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(mask))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class TGCA(nn.Module):
    """Frozen base DiT3D + trainable mask encoder, time gate and per-layer scales.

    forward(x, t, mask, y=None) -> the base model's prediction (same shape as x).
    mask=None skips the adapter (the base model). The null condition for guidance
    is an all-zero mask: that is what condition dropout trains.
    """

    def __init__(self, base: DiT, mask_channels: int, inject_layers: Optional[Union[int, Sequence[int]]] = None,
                 finetune_last_n_blocks: int = 0, condition_dropout_prob: float = 0.1,
                 adapter_scale_init: float = 0.1, control_norm: bool = False,
                 encoder_channels: Sequence[int] = ENCODER_CHANNELS):
        """control_norm: LayerNorm (no affine, eps 1e-6) of each scaled control before it is
        added, as the published VolDiT DiTBlock does (its ``control_norm``); converted
        VolDiT checkpoints need it, models trained here do without (DESIGN §4).
        encoder_channels: the mask encoder's widths, one stride-2 stage between each pair.
        The published four stages (16x) match a ct-ds8 latent with patch 2; for another
        VQ-GAN factor x patch, len - 1 = log2(factor x patch) keeps one control token per
        patch computed from its own voxels instead of interpolated from a coarser grid."""
        super().__init__()
        if base.config.spatial_dims != 3:
            raise ValueError("TGCA conditions DiT3D models (3D latents); the base model is 4D")
        depth = len(base.blocks)
        if inject_layers is None:
            layers = list(range(depth))
        elif isinstance(inject_layers, int):  # the last n blocks
            layers = list(range(depth - inject_layers, depth))
        else:
            layers = sorted(int(i) for i in inject_layers)
        if not layers or min(layers) < 0 or max(layers) >= depth:
            raise ValueError(f"inject_layers {inject_layers!r} must name blocks 0..{depth - 1}")
        if not 0 <= finetune_last_n_blocks <= depth:
            raise ValueError(f"finetune_last_n_blocks must be in 0..{depth}, got {finetune_last_n_blocks}")
        self.base = base
        self.mask_channels = mask_channels
        self.inject_layers = layers
        self.finetune_last_n_blocks = finetune_last_n_blocks
        self.condition_dropout_prob = condition_dropout_prob
        self.control_norm = control_norm
        hidden = base.config.hidden_size
        self.condition_embedder = MaskEncoder(mask_channels, hidden, tuple(encoder_channels))
        self.time_gate = nn.Linear(hidden, 1)
        nn.init.zeros_(self.time_gate.weight)
        nn.init.zeros_(self.time_gate.bias)
        self.adapter_scales = nn.Parameter(torch.full((len(layers),), float(adapter_scale_init)))
        self._freeze_base()

    def _freeze_base(self) -> None:
        for p in self.base.parameters():
            p.requires_grad_(False)
        n = self.finetune_last_n_blocks
        if n > 0:
            for block in self.base.blocks[len(self.base.blocks) - n:]:
                block.requires_grad_(True)
            self.base.final_layer.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.finetune_last_n_blocks == 0:
            self.base.eval()  # a fully frozen base never uses dropout
        return self

    def check_mask(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if mask.dim() != 5 or mask.shape[1] != self.mask_channels or mask.shape[0] != x.shape[0]:
            raise ValueError(f"TGCA mask must be (B={x.shape[0]}, {self.mask_channels}, D, H, W), "
                             f"got {tuple(mask.shape)}")

    def control_tokens(self, mask: torch.Tensor, t_emb: torch.Tensor, grid: tuple) -> torch.Tensor:
        """(B, N, hidden) control tokens, gated per sample."""
        cond = self.condition_embedder(mask.to(self.time_gate.weight.dtype))
        if tuple(cond.shape[2:]) != tuple(grid):
            cond = F.interpolate(cond, size=grid, mode="trilinear", align_corners=False)
        tokens = cond.flatten(2).transpose(1, 2)
        gate = torch.sigmoid(self.time_gate(t_emb)).unsqueeze(1)  # (B, 1, 1)
        return gate * tokens

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor],
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens, c, t_emb, grid, rope = self.base.embed(x, t, y)
        controls = None
        if mask is not None:
            self.check_mask(x, mask)
            if self.training:
                mask = drop_whole_masks(mask, self.condition_dropout_prob)
            control = self.control_tokens(mask, t_emb, grid)
            controls = {layer: self.adapter_scales[i] * control for i, layer in enumerate(self.inject_layers)}
            if self.control_norm:
                controls = {k: F.layer_norm(v, (v.shape[-1],), eps=1e-6) for k, v in controls.items()}
        tokens = self.base.run_blocks(tokens, c, rope, controls)
        return self.base.head(tokens, c, grid)


def one_hot_mask(labels: torch.Tensor, label_values: Sequence[int]) -> torch.Tensor:
    """(B, D, H, W) integer label map -> (B, K, D, H, W) float one-hot over label_values."""
    return torch.stack([(labels == v) for v in label_values], dim=1).float()
