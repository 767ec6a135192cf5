"""Named VQ-GAN configurations: the published stage-1 models and CPU-sized ones."""
from __future__ import annotations

from dataclasses import replace

from medgen_rt.models.vqgan.config import VQGANConfig

_DS2 = (2, 4, 1, 1)
_US2 = (2, 4, 1, 1, 0)

# The published stage-1 configs (VolDiT configs/stage1/vqgan_ds8.yaml and vqgan_ds4.yaml,
# MedLoRD vqgan_ds4.yaml, CardioDiT vqgan_ds4.yaml for (H, W, T) slices) and CPU-sized ones.
PRESETS = {
    "ct-ds8": VQGANConfig(channels=(128, 256, 512), num_res_channels=(128, 256, 512), num_res_layers=2,
                          downsample_parameters=(_DS2,) * 3, upsample_parameters=(_US2,) * 3,
                          num_embeddings=4096, embedding_dim=8),
    "ct-ds4": VQGANConfig(channels=(128, 256), num_res_channels=(128, 256), num_res_layers=2,
                          downsample_parameters=(_DS2,) * 2, upsample_parameters=(_US2,) * 2,
                          num_embeddings=16384, embedding_dim=8),
    "ct-tiny": VQGANConfig(channels=(16, 32), num_res_channels=(16, 32), num_res_layers=1,
                           downsample_parameters=(_DS2,) * 2, upsample_parameters=(_US2,) * 2,
                           num_embeddings=256, embedding_dim=8),
    "cmr": VQGANConfig(channels=(128, 256), num_res_channels=(128, 256), num_res_layers=2,
                       downsample_parameters=(_DS2,) * 2, upsample_parameters=(_US2,) * 2,
                       num_embeddings=16384, embedding_dim=8),
    "cmr-tiny": VQGANConfig(channels=(16, 32), num_res_channels=(16, 32), num_res_layers=1,
                            downsample_parameters=(_DS2,) * 2, upsample_parameters=(_US2,) * 2,
                            num_embeddings=256, embedding_dim=8),
}
CINE_PRESETS = frozenset({"cmr", "cmr-tiny"})


def vqgan_config(name: str, **overrides) -> VQGANConfig:
    """A preset's configuration, with optional field overrides."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown VQ-GAN preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
    return replace(cfg, **overrides) if overrides else cfg
