"""Vector quantisation: the EMA codebook (nearest entries through :func:`medgen_rt.ops.vq_nearest`)
and its MONAI-layout wrapper."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from medgen_rt import ops


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    import contextlib

    return contextlib.nullcontext()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class EMACodebook(nn.Module):
    """EMA-learned codebook (van den Oord et al.; MONAI's ``EMAQuantizer``).

    forward(z): z (B, D, *S) channel-first, any number of spatial axes ->
    (quantized (B, D, *S) float32 with straight-through gradient, commitment loss
    (scalar, ``commitment_cost * mse(sg[e], z)``), indices (B, *S) int64).

    In training mode (or with ``update=True``) the codebook moves towards the mean
    of the vectors assigned to each entry: with counts ``n_k`` and sums ``s_k`` of
    this batch (all-reduced over DDP ranks when torch.distributed is initialised
    and ``ddp_sync``), ``N <- decay*N + (1-decay)*n``, ``W <- decay*W + (1-decay)*s``,
    Laplace-smoothed ``N'_k = (N_k + eps) / (sum N + K*eps) * sum N`` and
    ``embedding_k = W_k / N'_k``. Quantized vectors and the loss use the codebook
    from before the update. The embedding has no gradient (``requires_grad=False``).

    dead_code_threshold > 0 (CardioDiT's option; 0, the MONAI / VolDiT behaviour,
    turns it off): after the EMA step, entries whose ``N_k`` fell below it restart at
    randomly drawn vectors of the batch with ``N_k = threshold`` (rank 0 draws them and
    broadcasts, so DDP replicas stay identical).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, decay: float = 0.99,
                 epsilon: float = 1e-5, embedding_init: str = "normal", ddp_sync: bool = True,
                 dead_code_threshold: float = 0.0):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.commitment_cost = float(commitment_cost)
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        self.ddp_sync = bool(ddp_sync)
        self.dead_code_threshold = float(dead_code_threshold)
        self.embedding = nn.Embedding(self.num_embeddings, self.embedding_dim)
        if embedding_init == "kaiming_uniform":
            nn.init.kaiming_uniform_(self.embedding.weight.data, mode="fan_in", nonlinearity="linear")
        self.embedding.weight.requires_grad_(False)
        self.register_buffer("ema_cluster_size", torch.zeros(self.num_embeddings))
        self.register_buffer("ema_w", self.embedding.weight.data.clone())
        self.perplexity = torch.zeros(())

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() < 2 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"EMACodebook: expected (B, {self.embedding_dim}, ...) channel-first latents, "
                             f"got shape {tuple(z.shape)}")
        # A view when z is channels-last in memory; vq_nearest accepts any strides.
        return z.movedim(1, -1).reshape(-1, self.embedding_dim)

    def _nearest(self, flat: torch.Tensor):
        with _no_autocast(flat.device):
            return ops.vq_nearest(flat.float(), self.embedding.weight.float())

    def _unflatten(self, z: torch.Tensor, idx: torch.Tensor, q: torch.Tensor):
        spatial = (z.shape[0],) + tuple(z.shape[2:])
        return idx.view(spatial), q.view(*spatial, self.embedding_dim).movedim(-1, 1)

    def lookup(self, z: torch.Tensor):
        """(indices (B, *S) int64, quantized (B, D, *S) float32) without any update or gradient."""
        flat = self._flatten(z)
        return self._unflatten(z, *self._nearest(flat))

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, *S) -> codebook vectors (B, D, *S)."""
        return self.embedding(indices).movedim(-1, 1)

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: Optional[torch.Tensor] = None) -> None:
        """One EMA step from assigned vectors ``flat`` (N, D) and their ``indices`` (N,)
        (``counts``: their bincount, when already at hand)."""
        if counts is None:
            counts = torch.bincount(indices, minlength=self.num_embeddings)
        counts = counts.to(torch.float32)
        sums = torch.zeros(self.num_embeddings, self.embedding_dim, dtype=torch.float32, device=flat.device)
        sums.index_add_(0, indices, flat.float())
        if self.ddp_sync and _distributed():
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        d = self.decay
        self.ema_cluster_size.mul_(d).add_(counts, alpha=1.0 - d)
        self.ema_w.mul_(d).add_(sums, alpha=1.0 - d)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.embedding.weight.data.copy_(self.ema_w / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.ema_cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())  # the same on every rank: the statistics were all-reduced
        sync = self.ddp_sync and _distributed()
        if num_dead == 0 or (flat.shape[0] == 0 and not sync):
            return
        repl = torch.zeros(num_dead, self.embedding_dim, dtype=torch.float32, device=flat.device)
        if (not sync or torch.distributed.get_rank() == 0) and flat.shape[0] > 0:
            repl.copy_(flat[torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)])
        if sync:
            torch.distributed.broadcast(repl, src=0)
        count = max(self.dead_code_threshold, self.epsilon)
        self.ema_cluster_size[dead] = count
        self.ema_w[dead] = repl * count

    def forward(self, z: torch.Tensor, update: Optional[bool] = None):
        update = self.training if update is None else bool(update)
        with _no_autocast(z.device):
            zf = z.float()
            flat = self._flatten(zf.detach())
            flat_idx, flat_q = self._nearest(flat)
            indices, quantized = self._unflatten(zf, flat_idx, flat_q)
            if flat_idx.device.type != "meta":
                counts = torch.bincount(flat_idx, minlength=self.num_embeddings)
                probs = counts.float() / max(flat_idx.numel(), 1)
                self.perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum()).detach()
                if update:
                    self.ema_update(flat, flat_idx, counts)
            loss = self.commitment_cost * F.mse_loss(quantized, zf)
            quantized = zf + (quantized - zf).detach()  # straight-through: d/dz = identity
        return quantized, loss, indices


class VectorQuantizer(nn.Module):
    """Wrapper holding the codebook as ``quantizer`` (MONAI's layout, so the
    state-dict keys are ``quantizer.quantizer.*``) and its last ``perplexity``."""

    def __init__(self, quantizer: EMACodebook):
        super().__init__()
        self.quantizer = quantizer

    @property
    def perplexity(self) -> torch.Tensor:
        return self.quantizer.perplexity

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    def forward(self, z: torch.Tensor, update: Optional[bool] = None):
        """-> (quantized, loss, indices); see :class:`EMACodebook`."""
        return self.quantizer(z, update=update)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantizer.embed(indices)

    def lookup(self, z: torch.Tensor):
        return self.quantizer.lookup(z)
