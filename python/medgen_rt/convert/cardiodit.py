"""CardioDiT (Cardio-AI/cardiodit): spatiotemporal VQ-GAN on 2D+t slices + DiT4D.

The VQ-GAN is MONAI's VQVAE layout run on (H, W, T) slices (src/models/vqvae.py;
default dead-code threshold 0.5, per-axis kernels in the asymmetric configs) and
becomes a CineVQGAN. The published sampler (src/scripts/sample_dit.py) draws a
latent (C, D, H, W, T), D = slices, decodes slice by slice and stacks the images
to (H, W, D, T): the same layout as CineVQGAN's latent (C, Z, X', Y', T') and
image (X, Y, Z, T). The DiT4D's patch vector is einops "(c pz ph pw pt)" over a
(Z, H, W, T) latent, tokens run over the grid in (z h w t) order, and the
unpatchify reshape is (zg, hg, wg, tg, pz, ph, pw, pt, C): medgen_rt's DiT uses
the same orders, so every tensor keeps its name (see medgen_rt.convert.dit).
"""
from __future__ import annotations

from medgen_rt.convert.common import ConversionError, PublishedConfig, Source
from medgen_rt.convert.dit import convert_dit, dit_config

SYSTEM = "cardiodit"
ROLES = ("vqgan", "dit")
PUBLISHED_DEAD_CODE_THRESHOLD = 0.5  # CardioDiT's EMAQuantizer default (training only)


def convert(weights: dict, cfg: PublishedConfig, opts, notes: list, deviations: list) -> dict:
    from medgen_rt.convert.vqgan import convert_vqgan, latent_channels

    if "dit" not in weights:
        raise ConversionError("cardiodit: give the DiT4D checkpoint as well as the VQ-GAN's")
    vq_source = Source(weights["vqgan"].tensors, str(weights["vqgan"].path))
    threshold = float(cfg.vqgan.get("dead_code_threshold", PUBLISHED_DEAD_CODE_THRESHOLD))
    vqgan, vq_config = convert_vqgan(vq_source, cfg, cine=True, dead_code_threshold=threshold)
    if vqgan.config.spatial_dims != 3:
        raise ConversionError("cardiodit: the VQ-GAN must work on (H, W, T) slices (spatial_dims 3)")
    dit_source = Source(weights["dit"].tensors, str(weights["dit"].path))
    config = dit_config(dit_source, cfg, 4, latent_channels(vqgan), notes, num_heads=opts.num_heads,
                        patch_size=opts.patch_size, latent_shape=opts.latent_shape)
    dit = convert_dit(dit_source, config)
    return {"vae": (vqgan, vq_config, [vq_source]), "dit": (dit, config.to_dict(), [dit_source])}
