"""MONAI ``VQVAE`` / published checkpoints (VolDiT, CardioDiT, MedLoRD): constructor
arguments and state_dict loading (keys are identical; see the package docstring)."""
from __future__ import annotations

from typing import Mapping

import torch

from medgen_rt.models.vqgan.autoencoder import VQGAN3D
from medgen_rt.models.vqgan.config import VQGANConfig


_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
_EMA_KEYS = ("quantizer.quantizer.ema_cluster_size", "quantizer.quantizer.ema_w")


def monai_vqvae_kwargs(config: VQGANConfig) -> dict:
    """Arguments for ``monai.networks.nets.VQVAE`` that build the same network
    (isotropic levels only: MONAI rejects per-axis stride/kernel tuples)."""
    if config.dead_code_threshold > 0:
        raise ValueError("MONAI's VQVAE has no dead-code restart; use dead_code_threshold=0")
    return dict(spatial_dims=config.spatial_dims, in_channels=config.in_channels, out_channels=config.out_channels,
                channels=config.channels, num_res_layers=config.num_res_layers,
                num_res_channels=config.num_res_channels, downsample_parameters=config.downsample_parameters,
                upsample_parameters=config.upsample_parameters, num_embeddings=config.num_embeddings,
                embedding_dim=config.embedding_dim, commitment_cost=config.commitment_cost, decay=config.decay,
                epsilon=config.epsilon, embedding_init=config.embedding_init, dropout=config.dropout,
                output_act=config.output_act.upper() if config.output_act else None)


def strip_wrapper_prefixes(state: Mapping) -> dict:
    """A state_dict without the DDP ``module.`` and torch.compile ``_orig_mod.`` key prefixes."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def load_monai_vqvae_state_dict(model: VQGAN3D, state_dict: Mapping, strict: bool = True):
    """Load a MONAI ``VQVAE`` (or VolDiT / CardioDiT / MedLoRD VQ-GAN) state_dict into ``model``.

    Keys are identical (see the module docstring); this unwraps a checkpoint dict
    (``state_dict`` / ``model_state_dict`` / ``model`` entries), strips the DDP and
    torch.compile prefixes ``module.`` / ``_orig_mod.``, and checks shapes with a
    readable error. A checkpoint without the EMA buffers (inference exports) gets
    ``ema_w = embedding`` and ``ema_cluster_size = 0``, a fresh EMA state; they only
    matter for further training. Returns torch's ``(missing_keys, unexpected_keys)``.
    """
    sd = state_dict
    for key in _CONTAINER_KEYS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    out = strip_wrapper_prefixes(sd)
    emb = "quantizer.quantizer.embedding.weight"
    if emb in out and not any(k in out for k in _EMA_KEYS):
        out[_EMA_KEYS[0]] = torch.zeros(out[emb].shape[0], dtype=torch.float32)
        out[_EMA_KEYS[1]] = out[emb].detach().clone().float()
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in out.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError("load_monai_vqvae_state_dict: shape mismatch (is the configuration the checkpoint's?):\n  "
                         + "\n  ".join(bad))
    return model.load_state_dict(out, strict=strict)
