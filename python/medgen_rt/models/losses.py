"""Autoencoder (VQ-GAN) losses: L1 reconstruction, the quantizer's commitment
loss, least-squares PatchGAN adversarial losses with a warm-up, an optional
spectral (FFT magnitude, "Jukebox") loss and an optional perceptual loss that
only runs on weights the user has on disk (nothing is ever downloaded).

Generator objective (what the published VolDiT / CardioDiT / MedLoRD code optimises):
``l1_weight*|x'-x|_1 + vq_loss + w_adv(step)*LS_G(D(x')) + spectral_weight*S(x', x)
+ perceptual_weight*P(x', x)``, with ``w_adv(step) = 0`` before ``adv_start`` steps
and ``adv_weight`` from then on. Discriminator: ``w_adv(step) > 0`` gates it,
``0.5*(LS(D(x), real) + LS(D(sg[x']), fake))``.

Least squares as in MONAI's ``PatchAdversarialLoss`` (the published default): the
logits pass a LeakyReLU(0.05) (``activation_slope=None`` removes it), then
``mean((a - target)^2)`` with target 1 for real and 0 for fake.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "l1_loss", "ls_generator_loss", "ls_discriminator_loss", "adversarial_weight",
    "SpectralLoss", "MedicalNetResNet", "PerceptualLoss", "VQGANLoss",
]

DEFAULT_ACTIVATION_SLOPE = 0.05


def l1_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error, computed in float32."""
    return F.l1_loss(reconstruction.float(), target.float())


def _logits(d_out) -> torch.Tensor:
    """A discriminator output: a tensor, or MONAI's list whose last item is the logits."""
    if isinstance(d_out, (list, tuple)):
        d_out = d_out[-1]
    if not isinstance(d_out, torch.Tensor):
        raise TypeError(f"expected discriminator logits (a tensor or a list ending in one), got {type(d_out)}")
    return d_out.float()


def _ls(logits: torch.Tensor, target: float, activation_slope: Optional[float]) -> torch.Tensor:
    a = F.leaky_relu(logits, activation_slope) if activation_slope is not None else logits
    return ((a - target) ** 2).mean()


def ls_generator_loss(fake_logits, activation_slope: Optional[float] = DEFAULT_ACTIVATION_SLOPE) -> torch.Tensor:
    """``mean((act(D(x')) - 1)^2)``: the generator wants its output judged real."""
    return _ls(_logits(fake_logits), 1.0, activation_slope)


def ls_discriminator_loss(real_logits, fake_logits,
                          activation_slope: Optional[float] = DEFAULT_ACTIVATION_SLOPE) -> torch.Tensor:
    """``0.5 * (mean((act(D(x)) - 1)^2) + mean(act(D(x'))^2))``."""
    return 0.5 * (_ls(_logits(real_logits), 1.0, activation_slope) + _ls(_logits(fake_logits), 0.0, activation_slope))


def adversarial_weight(step: int, adv_start: int, adv_weight: float) -> float:
    """Warm-up: 0 before ``adv_start`` steps, ``adv_weight`` from step ``adv_start`` on."""
    return 0.0 if int(step) < int(adv_start) else float(adv_weight)


class SpectralLoss(nn.Module):
    """MSE between FFT magnitudes (MONAI's ``JukeboxLoss``: orthonormal n-D FFT over
    the channel and spatial axes of (B, C, *S))."""

    def __init__(self, fft_norm: str = "ortho"):
        super().__init__()
        self.fft_norm = fft_norm

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, target.dim()))
        a = torch.fft.fftn(reconstruction.float(), dim=dims, norm=self.fft_norm).abs()
        b = torch.fft.fftn(target.float(), dim=dims, norm=self.fft_norm).abs()
        return F.mse_loss(a, b)


# ---- perceptual loss on a local MedicalNet-style 3D ResNet ----------------------------------

class _BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:  # MedicalNet's shortcut type "B"
            self.downsample = nn.Sequential(nn.Conv3d(cin, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class MedicalNetResNet(nn.Module):
    """3D ResNet-10/18 with MedicalNet's layout (Chen et al. 2019): conv1 7^3 stride 2,
    max-pool, layer1 (64), layer2 (128, stride 2), layer3 (256, dilation 2), layer4
    (512, dilation 4), basic blocks, shortcut "B". Key names match MedicalNet's
    checkpoints (``conv1.weight``, ``bn1.*``, ``layer{1..4}.{j}.*``); its segmentation
    head ``conv_seg`` is not part of this network. Returns the four layer outputs."""

    DEPTHS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}

    def __init__(self, depth: int = 10, in_channels: int = 1):
        super().__init__()
        if depth not in self.DEPTHS:
            raise ValueError(f"depth must be one of {sorted(self.DEPTHS)}, got {depth!r}")
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        cin = 64
        for i, (planes, stride, dil, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 1, 1), (1, 1, 2, 4),
                                                         self.DEPTHS[depth])):
            blocks = [_BasicBlock(cin, planes, stride, dil)] + [_BasicBlock(planes, planes, 1, dil)
                                                                 for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes

    def forward(self, x: torch.Tensor) -> list:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feats = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / torch.sqrt((f * f).sum(dim=1, keepdim=True) + eps)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on the features of a frozen MedicalNet-style 3D ResNet
    whose weights the user provides as a local file.

    weights_path: a ``torch.save`` file holding the network's state_dict (or a dict
    with a ``state_dict`` entry, as MedicalNet ships them; ``module.`` prefixes and
    the ``conv_seg`` head are ignored). Nothing is downloaded: a missing or absent
    path raises. Each volume is z-scored, features of ``layers`` are unit-normalised
    across channels, and the loss is the mean over layers of the spatially averaged
    channel-summed squared difference. Input (B, 1, X, Y, Z); the network is in
    eval mode with ``requires_grad=False`` (gradients flow to the input only).
    """

    def __init__(self, weights_path: Union[str, os.PathLike, None], depth: int = 10,
                 layers: Sequence[int] = (1, 2, 3, 4)):
        super().__init__()
        if weights_path is None:
            raise ValueError("PerceptualLoss needs weights_path: a local file with MedicalNet-style 3D ResNet "
                             "weights; medgen_rt never downloads weights (set perceptual_weight=0 to go without)")
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PerceptualLoss: weights file {path!r} does not exist; give the path of a local "
                                    "MedicalNet-style 3D ResNet state_dict (nothing is downloaded)")
        layers = tuple(int(i) for i in layers)
        if not layers or any(i not in (1, 2, 3, 4) for i in layers):
            raise ValueError(f"layers must be a non-empty subset of (1, 2, 3, 4), got {layers!r}")
        self.layers = layers
        self.net = MedicalNetResNet(depth)
        from medgen_rt.io.limits import check_zip_records

        check_zip_records(path)  # a record claiming far more than the file holds is refused before reading
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("conv_seg")}
        own = self.net.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = sorted(k for k in set(sd) & set(own) if tuple(sd[k].shape) != tuple(own[k].shape))
        if missing or unexpected or wrong:
            def some(keys):
                return f"{keys[:4]}{' ...' if len(keys) > 4 else ''}"

            raise ValueError(f"PerceptualLoss: {path!r} does not hold a MedicalNet ResNet-{depth} state_dict "
                             f"(missing {some(missing)}, unexpected {some(unexpected)}, wrong shape {some(wrong)})")
        self.net.load_state_dict(sd)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # frozen statistics
        return self

    @staticmethod
    def _zscore(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = flat.mean(1).view(-1, *([1] * (x.dim() - 1)))
        std = flat.std(1).view(-1, *([1] * (x.dim() - 1)))
        return (x - mean) / (std + 1e-6)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if reconstruction.dim() != 5 or reconstruction.shape[1] != 1:
            raise ValueError(f"PerceptualLoss expects (B, 1, X, Y, Z) volumes, got {tuple(reconstruction.shape)}")
        fa = self.net(self._zscore(reconstruction.float()))
        fb = self.net(self._zscore(target.float()))
        terms = [((_unit_channels(fa[i - 1]) - _unit_channels(fb[i - 1])) ** 2).sum(1).mean() for i in self.layers]
        return torch.stack(terms).mean()


# ---- the combined loss ------------------------------------------------------------------

class VQGANLoss(nn.Module):
    """All VQ-GAN terms; returns dicts of named terms.

    ``generator_loss(images, reconstruction, vq_loss, discriminator, step)`` ->
    {"loss", "l1", "vq", "adv", "adv_weight", "spectral", "perceptual"};
    ``discriminator_loss(images, reconstruction, discriminator, step)`` ->
    {"loss", "d_real", "d_fake"} (all zero and without graph during the warm-up:
    check :meth:`adversarial_active` before stepping the discriminator).

    vq_loss already includes the commitment cost (0.25 * mse) from the quantizer;
    ``vq_weight`` scales it further (1 in the published code).
    """

    def __init__(self, l1_weight: float = 1.0, vq_weight: float = 1.0, adv_weight: float = 0.005,
                 adv_start: int = 0, spectral_weight: float = 0.0, perceptual_weight: float = 0.0,
                 perceptual: Optional[nn.Module] = None,
                 activation_slope: Optional[float] = DEFAULT_ACTIVATION_SLOPE):
        super().__init__()
        for name, v in (("l1_weight", l1_weight), ("vq_weight", vq_weight), ("adv_weight", adv_weight),
                        ("spectral_weight", spectral_weight), ("perceptual_weight", perceptual_weight)):
            if not float(v) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if int(adv_start) < 0:
            raise ValueError(f"adv_start must be >= 0, got {adv_start!r}")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual network: "
                             "perceptual=PerceptualLoss('<local weights file>')")
        self.l1_weight = float(l1_weight)
        self.vq_weight = float(vq_weight)
        self.adv_weight = float(adv_weight)
        self.adv_start = int(adv_start)
        self.spectral_weight = float(spectral_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.activation_slope = activation_slope
        self.spectral = SpectralLoss() if self.spectral_weight > 0 else None
        self.perceptual = perceptual if self.perceptual_weight > 0 else None

    def adversarial_weight(self, step: int) -> float:
        return adversarial_weight(step, self.adv_start, self.adv_weight)

    def adversarial_active(self, step: int) -> bool:
        return self.adversarial_weight(step) > 0.0

    def generator_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, vq_loss: torch.Tensor,
                       discriminator: Optional[nn.Module] = None, step: int = 0) -> dict:
        zero = reconstruction.new_zeros((), dtype=torch.float32)
        l1 = l1_loss(reconstruction, images)
        vq = vq_loss.float().mean()
        w_adv = self.adversarial_weight(step)
        if w_adv > 0:
            if discriminator is None:
                raise ValueError(f"step {step} >= adv_start {self.adv_start} with adv_weight > 0 "
                                 "needs the discriminator")
            adv = ls_generator_loss(discriminator(reconstruction.contiguous()), self.activation_slope)
        else:
            adv = zero
        spectral = self.spectral(reconstruction, images) if self.spectral is not None else zero
        perceptual = self.perceptual(reconstruction, images) if self.perceptual is not None else zero
        total = (self.l1_weight * l1 + self.vq_weight * vq + w_adv * adv
                 + self.spectral_weight * spectral + self.perceptual_weight * perceptual)
        return {"loss": total, "l1": l1, "vq": vq, "adv": adv, "adv_weight": zero + w_adv,
                "spectral": spectral, "perceptual": perceptual}

    def discriminator_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, discriminator: nn.Module,
                           step: int = 0) -> dict:
        if not self.adversarial_active(step):
            zero = images.new_zeros((), dtype=torch.float32)
            return {"loss": zero, "d_real": zero, "d_fake": zero}
        real = _logits(discriminator(images.detach().contiguous()))
        fake = _logits(discriminator(reconstruction.detach().contiguous()))
        d_real = _ls(real, 1.0, self.activation_slope)
        d_fake = _ls(fake, 0.0, self.activation_slope)
        return {"loss": 0.5 * (d_real + d_fake), "d_real": d_real, "d_fake": d_fake}

    def forward(self, images, reconstruction, vq_loss, discriminator=None, step: int = 0) -> dict:
        return self.generator_loss(images, reconstruction, vq_loss, discriminator, step)
