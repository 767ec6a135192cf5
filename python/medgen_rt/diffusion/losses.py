"""Training objective of the discrete-time diffusion models.

The published VolDiT/CardioDiT setting is v-prediction with a smooth-L1 (Huber,
beta = 1) loss averaged over all elements (``F.smooth_l1_loss(pred.float(),
target.float())`` in Cardio-AI/voldit ``src/training/dit_trainer.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import NoiseSchedule, check_prediction_type

LOSS_KINDS = ("smooth_l1", "l1", "mse")
LOSS_REDUCTIONS = ("mean", "per_sample")


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    kind: str = "smooth_l1",
    beta: float = 1.0,
    *,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Element-wise loss between a model output and its target, both (B, C, ...).

    kind: ``"smooth_l1"`` (Huber with threshold ``beta``; 0.5 x^2 / beta below
    beta, |x| - 0.5 beta above, as ``torch.nn.functional.smooth_l1_loss``),
    ``"l1"`` or ``"mse"``. Half-precision inputs are upcast to float32 first.

    weights: optional per-sample weights (B,) (e.g. min-SNR), applied to the
    per-sample means. reduction: ``"mean"`` -> scalar (mean over samples of the
    per-sample mean, which equals the plain element mean when unweighted),
    ``"per_sample"`` -> (B,).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}; got {kind!r}")
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}; got {reduction!r}")
    if tuple(model_output.shape) != tuple(target.shape):
        raise ValueError(
            f"target has shape {tuple(target.shape)}, expected the model output's {tuple(model_output.shape)}"
        )
    if model_output.ndim < 1:
        raise ValueError("model_output must have a batch axis")
    pred, tgt = model_output, target
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()
    if tgt.dtype != pred.dtype:
        tgt = tgt.to(pred.dtype)
    if kind == "smooth_l1":
        if not beta >= 0.0:
            raise ValueError(f"beta must be >= 0; got {beta}")
        elem = F.smooth_l1_loss(pred, tgt, reduction="none", beta=float(beta))
    elif kind == "l1":
        elem = (pred - tgt).abs()
    else:
        elem = (pred - tgt).square()
    per_sample = elem.reshape(elem.shape[0], -1).mean(dim=1)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=per_sample.dtype, device=per_sample.device)
        if w.shape != per_sample.shape:
            raise ValueError(f"weights must have shape ({per_sample.shape[0]},); got {tuple(w.shape)}")
        per_sample = per_sample * w
    return per_sample.mean() if reduction == "mean" else per_sample


def training_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t,
    schedule: NoiseSchedule,
    prediction_type: str = "v_prediction",
) -> torch.Tensor:
    """The regression target for ``x_t = schedule.add_noise(x0, noise, t)``.

    epsilon -> ``noise``; v_prediction -> ``sqrt(a_bar) noise - sqrt(1 - a_bar) x0``;
    sample -> ``x0``. (Rectified flow has its own pair: :func:`flow_training_pair`.)
    """
    check_prediction_type(prediction_type)
    return schedule.model_target(x0, noise, t, prediction_type)
