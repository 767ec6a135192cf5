"""Feature extractors for FID and MMD. Nothing is downloaded: a pretrained network is
used only when the user names a local weights file.

* ``encoder`` (default): the copy-detection encoder (:mod:`.encoder`), trained on the
  real set or loaded from ``--encoder``.
* ``medicalnet:PATH``: a MedicalNet 3D ResNet checkpoint (Chen et al. 2019; the
  ``resnet_10/18/34/50...pth`` files, keys optionally prefixed ``module.``), loaded into
  MONAI's ResNet (the same layout); input one channel, z-scored over the body
  (voxels above the minimum), pooled features of the last stage. Cine: frames embedded
  one by one and averaged.
* ``radimagenet:PATH``: a RadImageNet 2D ResNet checkpoint in torchvision key layout
  (``conv1.weight``, ``layer1.0.conv1.weight``, ...), loaded into MONAI's 2D ResNet;
  axial slices (Z, and every frame of a cine) scaled to [0, 1], repeated to 3 channels,
  ImageNet-normalised; the features are the mean over slices.

The architecture (basic or bottleneck blocks, blocks per stage, A or B shortcuts) is
read from the checkpoint's keys.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["parse_features", "load_resnet_checkpoint", "PretrainedExtractor"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_features(text: str) -> tuple:
    """"encoder" -> ("encoder", None); "medicalnet:PATH" / "radimagenet:PATH" -> (kind, Path)."""
    if text in (None, "", "encoder"):
        return "encoder", None
    kind, sep, path = str(text).partition(":")
    if not sep or kind not in ("medicalnet", "radimagenet") or not path:
        raise ValueError(f"--features: expected 'encoder', 'medicalnet:PATH' or 'radimagenet:PATH', got {text!r}")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--features: weights file {p} not found (nothing is downloaded; give a local file)")
    return kind, p


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        from medgen_rt.io.limits import check_zip_records

        check_zip_records(path)  # a record claiming far more than the file holds is refused before reading
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for foreign pickles
            raise ValueError(f"--features: cannot read {path} as a PyTorch state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"--features: {path} does not hold a state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def load_resnet_checkpoint(path, spatial_dims: int) -> torch.nn.Module:
    """A MONAI ResNet (no classifier) with the architecture and weights of a checkpoint."""
    from monai.networks.nets import ResNet

    path = Path(path)
    state = _read_state(path)
    if "conv1.weight" not in state:
        raise ValueError(f"--features: {path} is not a ResNet checkpoint (no conv1.weight)")
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    layers = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not blocks:
            raise ValueError(f"--features: {path} has no layer{stage} weights")
        layers.append(max(blocks) + 1)
    inplanes = [int(state[f"layer{s}.0.conv1.weight"].shape[0]) for s in range(1, 5)]
    stem = state["conv1.weight"]
    # The stride is not in the weights: MedicalNet and torchvision ResNets both use a stride-2 stem.
    shortcut = "B" if any(".downsample." in k for k in state) else "A"
    net = ResNet(block="bottleneck" if bottleneck else "basic", layers=layers, block_inplanes=inplanes,
                 spatial_dims=spatial_dims, n_input_channels=int(stem.shape[1]),
                 conv1_t_size=tuple(int(s) for s in stem.shape[2:]), conv1_t_stride=2, shortcut_type=shortcut,
                 feed_forward=False, bias_downsample=any(k.endswith("downsample.0.bias") for k in state))
    want = net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    bad = [k for k in state if k in want and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or bad:
        raise ValueError(f"--features: {path} does not fit a {spatial_dims}D ResNet "
                         f"({len(missing)} missing tensors, e.g. {missing[:2]}; {len(bad)} of another shape)")
    net.load_state_dict(state, strict=False)
    return net.eval()


class PretrainedExtractor:
    """features(volume in raw units, modality) -> (D,) float64 with a MedicalNet or RadImageNet ResNet."""

    def __init__(self, kind: str, path):
        self.kind, self.path = kind, Path(path)
        self.net = load_resnet_checkpoint(path, 3 if kind == "medicalnet" else 2)
        self.name = f"{kind} ResNet ({self.path.name})"

    @torch.no_grad()
    def __call__(self, vol01: np.ndarray) -> np.ndarray:
        v = np.asarray(vol01, dtype=np.float32)
        frames = [v] if v.ndim == 3 else [v[..., t] for t in range(v.shape[3])]
        feats = []
        for f in frames:
            if self.kind == "medicalnet":
                body = f[f > f.min()] if np.any(f > f.min()) else f
                x = (f - body.mean()) / max(float(body.std()), 1e-6)
                feats.append(self.net(torch.from_numpy(x)[None, None]).double()[0])
            else:
                s = torch.from_numpy(np.ascontiguousarray(np.moveaxis(f, 2, 0)))[:, None].repeat(1, 3, 1, 1)
                mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
                std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
                feats.append(self.net((s - mean) / std).double().mean(0))
        return torch.stack(feats).mean(0).numpy()
