"""Training-free step caching for DiT-based denoisers (FORA / Delta-DiT / TeaCache family):
a block whose modulated input barely changed since its last full evaluation returns its input
plus the residual (output - input) of that evaluation instead of running attention and MLP.

The rule is per block, on the block's own modulated attention input h (after adaLN, with a
TGCA control added): skip when ``mean|h - h_ref| / mean|h_ref| < threshold``, h_ref being h at
the block's last full evaluation. Per block rather than TeaCache's first-block rule for the
whole stack because it needs no per-model calibration (TeaCache fits a rescaling polynomial
to each model), a fast-changing block is recomputed while slow ones are reused, and a TGCA
control, which enters each block's h, is seen by every decision. Measuring against the
reference instead of the previous step makes the change accumulate until it forces a
recompute, so the reuse cannot drift without bound.

One decision per block call for the whole batch: residuals are kept per batch row (the
conditional and null halves of a CFG batch each reuse their own), and a block is skipped only
when every row's change is below the threshold. ``threshold=0`` never skips (the test is
strict), and then the output is bit for bit that of an uncached model.

Usage: ``with StepCache(0.05).attach(net): x = sample(...)``; entering resets the cache
(one per sample), leaving detaches it, so training or another call never sees it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch


class StepCache:
    def __init__(self, threshold: float):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"--cache: the threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self._ref: dict = {}  # block index -> h at its last full evaluation
        self._residual: dict = {}  # block index -> output - input of that evaluation
        self.evaluated = 0
        self.skipped = 0

    def lookup(self, index: int, h: torch.Tensor):
        """The cached residual of block ``index`` if its input h moved less than the threshold
        since the last full evaluation (counted as skipped), else None."""
        ref = self._ref.get(index)
        if ref is not None and ref.shape == h.shape and self.threshold > 0:
            ref32 = ref.float()
            dims = tuple(range(1, h.dim()))
            change = (h.float() - ref32).abs().mean(dims) / ref32.abs().mean(dims).clamp_min(1e-12)
            if bool((change < self.threshold).all()):  # every row, the CFG halves alike
                self.skipped += 1
                return self._residual[index]
        return None

    def store(self, index: int, h: torch.Tensor, residual: torch.Tensor) -> None:
        self.evaluated += 1
        if self.threshold > 0:  # threshold 0 never reads them: keep no copies
            self._ref[index], self._residual[index] = h.detach(), residual.detach()

    def stats(self) -> dict:
        """For the sidecar: block calls (each on the whole batch) run and skipped."""
        total = self.evaluated + self.skipped
        return {"threshold": self.threshold, "block_evaluations": self.evaluated, "blocks_skipped": self.skipped,
                "skipped_fraction": round(self.skipped / total, 4) if total else 0.0}

    @contextmanager
    def attach(self, model):
        """Reset, let ``model``'s DiT consult this cache inside the block, then detach."""
        dit = cached_dit(model)
        self.reset()
        dit.step_cache = self
        try:
            yield self
        finally:
            dit.step_cache = None


def cached_dit(model):
    """The DiT whose blocks a cache serves: the model itself or a TGCA's base. Other denoisers
    (U-Net, ControlNet) have no adaLN blocks to cache: ValueError naming --cache."""
    from medgen_rt.models.dit import DiT

    dit = model if isinstance(model, DiT) else getattr(model, "base", None)
    if not isinstance(dit, DiT):
        raise ValueError(f"--cache: step caching needs a DiT-based model (dit, tgca); this is a "
                         f"{type(model).__name__}")
    return dit
