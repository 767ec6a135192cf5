"""Diffusion transformers over latent patch tokens: DiT3D (CT, VolDiT) and
DiT4D (cine, CardioDiT), one implementation for both.

Input x: (B, C, D, H, W) for 3D or (B, C, Z, H, W, T) for 4D latents; t: (B,)
timesteps; optional class labels y: (B,) int. Output: same shape as x (or 2C
channels with learn_sigma). Blocks are adaLN-Zero (shift/scale/gate for the
attention and the MLP branch, zero-initialised), with fixed sin-cos positional
embeddings, optional RoPE and qk-norm. All hot paths go through the op
registry (patch_embed, adaln_modulate, attention, gated_residual, unpatchify)
so kernels drop in without touching this file.

Parameter names follow the published code (x_embedder.proj, t_embedder.mlp,
blocks.i.attn.qkv/proj, blocks.i.mlp.fc1/fc2, blocks.i.adaLN_modulation.1,
final_layer.*), except that the 3D patch projection is stored as a Linear over
(C, p, p, p) patches: a published Conv3d weight (hidden, C, p, p, p) maps onto
it with a reshape. The positional embedding is a fixed buffer recomputed for
each grid, not a checkpoint tensor.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from medgen_rt import ops
from medgen_rt.models.embeddings import rope_tables, sincos_pos_embed, timestep_features
from medgen_rt.ops.patch_embed import grid_shape


@dataclass
class DiTConfig:
    input_size: tuple  # latent spatial size: (D, H, W) or (Z, H, W, T)
    patch_size: tuple  # (p, p, p) or (pz, ph, pw, pt)
    in_channels: int = 8
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    learn_sigma: bool = False
    num_classes: int = 0  # > 0: class-conditional, with a null class for guidance
    class_dropout_prob: float = 0.0
    qk_norm: bool = False
    rope: bool = False
    attn_dropout: float = 0.0
    mlp_dropout: float = 0.0
    frequency_embedding_size: int = 256
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.input_size = tuple(int(s) for s in self.input_size)
        if isinstance(self.patch_size, int):
            self.patch_size = (self.patch_size,) * len(self.input_size)
        self.patch_size = tuple(int(p) for p in self.patch_size)
        grid_shape(self.input_size, self.patch_size)  # raises when not divisible
        if len(self.input_size) not in (3, 4):
            raise ValueError(f"input_size must have 3 (DiT3D) or 4 (DiT4D) axes, got {self.input_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.rope and (self.hidden_size // self.num_heads) % 2:
            raise ValueError("RoPE needs an even head dimension")

    @property
    def spatial_dims(self) -> int:
        return len(self.input_size)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict:
        return asdict(self)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_embedding_size)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels with an extra null class (index num_classes) for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        if labels is None:  # unconditional: the null class
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, patch_size: Sequence[int], hidden_size: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Linear(in_channels * math.prod(patch_size), hidden_size)

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        return ops.patch_embed(x, self.proj.weight, self.proj.bias, self.patch_size, pos_embed)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU()  # exact GELU, as the published VolDiT/CardioDiT blocks
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)
        self.drop = nn.Dropout(dropout)

    def hidden(self, x):
        """Everything before fc2 (the block fuses fc2 into its gated residual)."""
        return self.drop(self.act(self.fc1(x)))

    def forward(self, x):
        return self.drop(self.fc2(self.hidden(x)))


class Attention(nn.Module):
    """Self-attention over tokens (B, N, C); heads split the channels."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        # qk-norm: LayerNorm over each head's channels, as in timm's Attention(qk_norm=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def attend(self, x: torch.Tensor, rope: Optional[tuple] = None) -> torch.Tensor:
        """Everything before the output projection: (B, N, C) heads concatenated
        (the block fuses proj into its gated residual)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim): attention runs over N
        # qk-norm runs inside the op (fused into the kernel), from these modules' parameters.
        out = ops.attention(q, k, v, rope, self.dropout if self.training else 0.0,
                            q_norm=self._norm_args(self.q_norm), k_norm=self._norm_args(self.k_norm))
        return out.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend(x, rope)))

    @staticmethod
    def _norm_args(norm: nn.Module) -> Optional[tuple]:
        """(weight, bias, eps) of a qk-norm LayerNorm for ops.attention; None for Identity."""
        if isinstance(norm, nn.Identity):
            return None
        return norm.weight, norm.bias, norm.eps


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.attn = Attention(h, cfg.num_heads, cfg.qk_norm, cfg.attn_dropout)
        self.mlp = Mlp(h, int(h * cfg.mlp_ratio), cfg.mlp_dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[tuple] = None,
                control: Optional[torch.Tensor] = None, cache=None, index: int = 0) -> torch.Tensor:
        """cache: a models.step_cache.StepCache, asked with this block's modulated input
        whether the residual of an earlier step (block ``index``) can stand in for the block."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = ops.adaln_modulate(x, shift_msa, scale_msa)
        if control is not None:  # TGCA: control tokens join the attention input, gate and scale intact
            h = h + control.to(h.dtype)
        if cache is not None:
            residual = cache.lookup(index, h)
            if residual is not None:
                return x + residual
        x_in = x
        x = self._gated_projection(x, gate_msa, self.attn.attend(h, rope), self.attn.proj, self.attn.proj_drop)
        h2 = ops.adaln_modulate(x, shift_mlp, scale_mlp)
        out = self._gated_projection(x, gate_mlp, self.mlp.hidden(h2), self.mlp.fc2, self.mlp.drop)
        if cache is not None:
            cache.store(index, h, out - x_in)
        return out

    def _gated_projection(self, x, gate, h, linear: nn.Linear, dropout: nn.Dropout) -> torch.Tensor:
        """x + gate * dropout(linear(h)); without active dropout one fused op, whose GEMM
        epilogue adds the residual so the projection is never written out."""
        if self.training and dropout.p > 0:
            return ops.gated_residual(x, gate, dropout(linear(h)))
        return ops.linear_gated_residual(x, gate, h, linear.weight, linear.bias)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(ops.adaln_modulate(x, shift, scale))


class DiT(nn.Module):
    """DiT over 3D or 4D latents; see the module docstring for shapes."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.x_embedder = PatchEmbed(cfg.in_channels, cfg.patch_size, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size)
        self.y_embedder = (LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
                           if cfg.num_classes > 0 else None)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.hidden_size, math.prod(cfg.patch_size), cfg.out_channels)
        self._grid_cache: dict = {}
        self.step_cache = None  # a StepCache while sampling with --cache (StepCache.attach), else None
        self.initialize_weights()

    # ---- construction -------------------------------------------------------------
    def initialize_weights(self) -> None:
        """As published: Xavier linears, N(0, 0.02) timestep MLP, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # the patch projection is initialised like the published Conv3d/Linear (Xavier on the flattened view)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    # ---- geometry -------------------------------------------------------------------
    def grid(self, spatial: Sequence[int]) -> tuple:
        return grid_shape(tuple(spatial), self.config.patch_size)

    def _fixed_tables(self, grid: tuple, device, dtype) -> tuple:
        """Positional embedding (and RoPE tables) for a grid, cached per grid and device."""
        key = (grid, str(device), dtype)
        if key not in self._grid_cache:
            pos = sincos_pos_embed(self.config.hidden_size, grid).to(device=device, dtype=dtype)
            rope = None
            if self.config.rope:
                cos, sin = rope_tables(self.config.hidden_size // self.config.num_heads, grid)
                rope = (cos.to(device), sin.to(device))
            self._grid_cache[key] = (pos, rope)
        return self._grid_cache[key]

    # ---- forward --------------------------------------------------------------------
    def embed(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> tuple:
        """Tokens (B, N, hidden), conditioning vector c (B, hidden), t embedding, grid, rope."""
        cfg = self.config
        if x.dim() != 2 + cfg.spatial_dims or x.shape[1] != cfg.in_channels:
            raise ValueError(f"DiT expects x of shape (B, {cfg.in_channels}, {cfg.spatial_dims} spatial axes), "
                             f"got {tuple(x.shape)}")
        grid = self.grid(x.shape[2:])
        pos, rope = self._fixed_tables(grid, x.device, self.x_embedder.proj.weight.dtype)
        tokens = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype), pos)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        t_emb = self.t_embedder(t)
        c = t_emb
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, x.shape[0], x.device)
        return tokens, c, t_emb, grid, rope

    def run_blocks(self, tokens, c, rope, controls: Optional[dict] = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            control = None if controls is None else controls.get(i)
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, c, rope, control, use_reentrant=False)
            else:
                tokens = block(tokens, c, rope, control, self.step_cache, i)
        return tokens

    def head(self, tokens, c, grid) -> torch.Tensor:
        out = self.final_layer(tokens, c)
        return ops.unpatchify(out, grid, self.config.patch_size, self.config.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                controls: Optional[dict] = None) -> torch.Tensor:
        tokens, c, _, grid, rope = self.embed(x, t, y)
        tokens = self.run_blocks(tokens, c, rope, controls)
        return self.head(tokens, c, grid)


# ---- presets ------------------------------------------------------------------------
# DiT3D sizes from VolDiT (depth, hidden, heads); latent of ct-ds8 at 512x512x256.
DIT3D_SIZES = {"XS": (6, 384, 6), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1152, 16)}
# DiT4D sizes matching the published CardioDiT parameter counts (87M / 130M / 172M).
DIT4D_SIZES = {"S": (8, 768, 12), "B": (12, 768, 12), "L": (16, 768, 12)}
CT_DS8_LATENT = (64, 64, 32)  # 512x512x256 / 8
CMR_LATENT = (6, 64, 64, 8)  # (Z, H, W, T): 6 slices of (256, 256, 32) / 4
CMR_PATCH = (1, 4, 4, 2)

DIT_PRESETS: dict = {}
for _name, (_depth, _hidden, _heads) in DIT3D_SIZES.items():
    for _p in (2, 4):
        # VolDiT trains with dropout 0.1 in attention, projection and MLP.
        DIT_PRESETS[f"dit3d-{_name.lower()}/{_p}"] = DiTConfig(
            input_size=CT_DS8_LATENT, patch_size=(_p,) * 3, hidden_size=_hidden, depth=_depth, num_heads=_heads,
            attn_dropout=0.1, mlp_dropout=0.1)
for _name, (_depth, _hidden, _heads) in DIT4D_SIZES.items():
    DIT_PRESETS[f"dit4d-{_name.lower()}"] = DiTConfig(
        input_size=CMR_LATENT, patch_size=CMR_PATCH, hidden_size=_hidden, depth=_depth, num_heads=_heads)
# Tiny presets for CPU training and tests.
DIT_PRESETS["dit3d-tiny"] = DiTConfig(input_size=(16, 16, 8), patch_size=(2, 2, 2), in_channels=8, hidden_size=64,
                                      depth=2, num_heads=2)
DIT_PRESETS["dit4d-tiny"] = DiTConfig(input_size=(4, 12, 12, 6), patch_size=(1, 2, 2, 2), in_channels=8,
                                      hidden_size=64, depth=2, num_heads=2)


def dit_config(name: str, **overrides) -> DiTConfig:
    """A preset by name (see DIT_PRESETS), with fields overridden."""
    try:
        base = DIT_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown DiT preset {name!r}; choose one of {', '.join(sorted(DIT_PRESETS))}") from None
    return replace(base, **overrides)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
