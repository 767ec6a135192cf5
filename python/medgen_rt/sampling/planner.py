"""Memory planner: before sampling, choose the denoiser's precision and batch and
the decoder's streaming axis and chunk so that each phase fits `max_vram`.

Each phase's peak is modelled as ``fixed + per_unit * units`` (a MemoryCost):

- denoise: fixed = weights (+ tables); unit = one token (DiT, TGCA) or one latent
  voxel (U-Net, ControlNet) of one batch element; the classifier-free guidance
  pass doubles the batch. The sampler's own tensors come on top, per volume: the
  latent and, for a mask-conditioned model, the mask (and with guidance its null) in
  the network's dtype.
- decode (streamed, see medgen_rt.sampling.decode): fixed = decoder weights and
  the latent; unit = one latent plane of a chunk times the latent cross-section
  (the voxels of the other two axes).

The per-unit costs are first computed from the layer shapes (analytic, no
device needed, so a plan for a GPU can be made on a laptop). On a CUDA device
they are then measured once per model, device and dtype (two probe runs, peak
allocated memory, a straight-line fit) and cached in
``$MEDGEN_CACHE`` (default ~/.cache/medgen_rt)/memory_costs.json; the measured
values replace the analytic ones. Sizes are binary: "8GB" = 8 GiB.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2 ** 30
# streamed decoding's transient buffers (window copies, padding, convolution workspaces, the steps
# that drain two planes, allocator slack) on top of the layer sizes: on the CPU the 512x512x256
# ct-ds8 decode at one plane per step peaked 1.9 GB above its weights and output, 4.1x the layer
# sizes (bench/results/decode-ct-ds8-512x512x256-cpu-2026-11-25.json). A GPU measures its own.
_DECODE_SLACK = 4.0
_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "KB": 2 ** 10, "KIB": 2 ** 10, "M": 2 ** 20, "MB": 2 ** 20, "MIB": 2 ** 20,
          "G": GIB, "GB": GIB, "GIB": GIB, "T": 2 ** 40, "TB": 2 ** 40, "TIB": 2 ** 40}


def parse_memory(value, name: str = "max_vram") -> Optional[int]:
    """'24GB', '24 GiB', '512MB', 8e9 or an int (bytes) -> bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{name} {value!r}: expected a size such as '8GB', '24GiB' or '512MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class MemoryCost:
    """Peak bytes of a phase = fixed + per_unit * units."""

    fixed: float
    per_unit: float
    unit: str
    source: str  # "analytic" or "measured on <device>"

    def bytes(self, units: float) -> float:
        return self.fixed + self.per_unit * units


@dataclass
class SamplingPlan:
    device: str
    max_vram_bytes: Optional[int]
    denoiser_dtype: str
    batch: int  # volumes denoised together
    decode_axis: int  # streamed axis of the decoder's input
    decode_chunk: int  # latent planes per streaming step
    predicted_peak_bytes: dict = field(default_factory=dict)  # phase -> bytes
    costs: dict = field(default_factory=dict)  # phase -> MemoryCost as dict
    sampler_bytes: int = 0  # the sampler's own tensors in the denoise peak (latents, masks), all volumes

    @property
    def predicted_peak_gb(self) -> dict:
        return {k: round(v / GIB, 3) for k, v in self.predicted_peak_bytes.items()}

    def to_dict(self) -> dict:
        d = asdict(self)
        # named for what is planned: the phase's tensors on the device (weights, activations), not
        # the process's memory that a CPU sidecar measures (peak_process_rss_gb)
        d["planned_tensor_peak_bytes"] = d.pop("predicted_peak_bytes")
        d["planned_tensor_peak_gb"] = self.predicted_peak_gb
        return d

    def describe(self) -> str:
        """The plan in a few lines, each phase's peak split into its parts."""
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        limit = f"max_vram {gib(self.max_vram_bytes)}" if self.max_vram_bytes else "no max_vram"
        denoise, decode = self.costs["denoise"], self.costs["decode"]
        activations = self.predicted_peak_bytes["denoise"] - denoise["fixed"] - self.sampler_bytes
        planes = decode["per_unit"] * self.decode_chunk
        return "\n".join([
            f"plan for {self.device}, {limit}: denoiser {self.denoiser_dtype}, batch {self.batch}; "
            f"decode along axis {self.decode_axis}, {self.decode_chunk} latent plane(s) per step",
            f"  denoise {gib(self.predicted_peak_bytes['denoise'])} = weights {gib(denoise['fixed'])} + activations "
            f"{gib(activations)} + the sampler's latents and masks {gib(self.sampler_bytes)} [{denoise['source']}]",
            f"  decode  {gib(self.predicted_peak_bytes['decode'])} = weights and latent "
            f"{gib(self.predicted_peak_bytes['decode'] - planes)} + {self.decode_chunk} plane(s) {gib(planes)} "
            f"[{decode['source']}]"])


# ---- analytic costs ---------------------------------------------------------------------------

def _param_bytes(module: nn.Module, element_size: int) -> int:
    return sum(p.numel() for p in module.parameters()) * element_size


def _dit_of(net: nn.Module):
    """The DiT inside a denoiser (itself, or the base of a TGCA model), else None."""
    from medgen_rt.models.dit import DiT

    if isinstance(net, DiT):
        return net
    base = getattr(net, "base", None)
    return base if isinstance(base, DiT) else None


def denoiser_units(net: nn.Module, latent_shape: Sequence[int]) -> int:
    """Units of the denoise cost for one volume: tokens for a DiT, latent voxels otherwise.
    latent_shape: (C, *spatial)."""
    dit = _dit_of(net)
    spatial = tuple(latent_shape[1:])
    if dit is not None:
        return math.prod(dit.grid(spatial))
    return math.prod(spatial)


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of the tensors a forward makes that are alive at once, as an allocator
    holds them: a new storage counts from the op that makes it until its last reference goes
    (views and in-place results share an input's storage and are not counted again). Tensors
    made before (weights, inputs) are not counted, nor workspaces inside a kernel."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._counted = set()

    def _free(self, key, nbytes):
        self._counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()  # one Python object per storage while it lives
            key = id(storage)
            if key in inputs or key in self._counted:
                continue
            nbytes = storage.nbytes()
            self._counted.add(key)
            self.live += nbytes
            self.largest = max(self.largest, nbytes)
            weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def denoiser_inputs(net: nn.Module, latent_channels: int, spatial: Sequence[int], device, dtype) -> tuple:
    """Zero inputs of one denoiser call at batch 1: (x, t) and, for a mask-conditioned U-Net
    (ControlledUNet), the mask at mask_downsample x the latent's size."""
    x = torch.zeros((1, latent_channels, *spatial), device=device, dtype=dtype)
    t = torch.zeros(1, device=device)
    factor = getattr(net, "mask_downsample", None)
    if factor is None:
        return x, t
    return x, t, torch.zeros((1, net.mask_channels, *(s * factor for s in spatial)), device=device, dtype=dtype)


def _probe_spatial(net: nn.Module, latent_shape: Sequence[int], divisor: int, floor: int) -> tuple:
    """A probe forward's spatial size: each latent axis divided by divisor (at least floor), as the
    network accepts it: a U-Net's rounded up to its downsampling factor, and the frame axis of a
    cine U-Net (folded into its channels) kept whole."""
    unet = net.base if isinstance(getattr(net, "base", None), nn.Module) else net
    f = getattr(unet, "downsample_factor", None)
    frames = getattr(getattr(unet, "config", None), "frames", 0) if f else 0
    axes = latent_shape[1:len(latent_shape) - (1 if frames else 0)]
    sizes = [max(floor, s // divisor) for s in axes]
    if f:
        sizes = [-(-s // f) * f for s in sizes]
    return tuple(sizes) + ((frames,) if frames else ())


def analytic_denoise_cost(net: nn.Module, latent_shape: Sequence[int], dtype: torch.dtype) -> MemoryCost:
    """Inference without gradients holds one block's activations at a time. A DiT block
    holds per token: the residual stream and its modulated copy (2h), qkv (3h), the
    attention output and projection (2h) and the MLP hidden before and after GELU
    (2 * mlp_ratio * h); attention itself is flash/memory-efficient (O(N)). TGCA adds
    its adapter's tokens.

    A U-Net (with or without a ControlNet) is probed: the tensors alive at once during a
    no-grad forward at a quarter of the latent's size per axis (_LiveTensors), per latent
    voxel. That is what its forward keeps at its peak: the skip connections held for the
    decoder, a ControlNet's residuals (and its mask stem's features while it runs), and the
    largest layer's input and output. One more of the largest tensor stands for a kernel's
    workspace (cuDNN). Every term grows with the voxels: attention runs through torch's
    scaled_dot_product_attention (models/unet.py), O(tokens), not an explicit matrix."""
    e = torch.finfo(dtype).bits // 8
    weights = _param_bytes(net, e)
    dit = _dit_of(net)
    if dit is not None:
        cfg = dit.config
        h = cfg.hidden_size
        per_token = (2 + 3 + 2 + 2 * cfg.mlp_ratio) * h * e
        per_token += 2 * h * 4  # the float32 positional table and the embedded tokens
        if dit is not net:  # TGCA: the mask encoder's tokens and one control per injected layer
            per_token += 2 * h * e
        return MemoryCost(fixed=weights, per_unit=per_token, unit="token", source="analytic")
    probe_spatial = _probe_spatial(net, latent_shape, divisor=4, floor=8)
    param = next(net.parameters())
    inputs = denoiser_inputs(net, latent_shape[0], probe_spatial, param.device, param.dtype)
    with torch.no_grad(), _LiveTensors() as live:
        net(*inputs)
    # the probe ran in the weights' dtype; the plan's dtype scales every activation
    per_voxel = (live.peak + live.largest) / math.prod(probe_spatial) * e / param.element_size()
    return MemoryCost(fixed=weights, per_unit=per_voxel, unit="latent voxel",
                      source="analytic (live tensors of a probe forward)")


def analytic_decode_cost(vae: nn.Module, latent_spatial: Sequence[int], axis: int,
                         dtype: torch.dtype = torch.float32) -> MemoryCost:
    """Streamed decoding per step: for the largest layer, its input window and output
    for one latent plane of chunk (planes scale with the layer's upsampling), plus
    the planes every layer keeps for its neighbours; times a slack for transient
    copies. latent_spatial: the decoder input's spatial shape (a cine slice for cine)."""
    from medgen_rt.models.vqgan import conv_layers

    e = torch.finfo(dtype).bits // 8
    n = len(latent_spatial)
    cross = math.prod(s for a, s in enumerate(latent_spatial) if a != axis)
    factor = [1.0] * n  # the resolution of the current layer's input, relative to the latent
    step_peak = kept = 0.0
    for conv in conv_layers(vae.decoder):
        transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        out_factor = [f * conv.stride[a] if transposed else f / conv.stride[a] for a, f in enumerate(factor)]
        cs_in = math.prod(f for a, f in enumerate(factor) if a != axis)
        cs_out = math.prod(f for a, f in enumerate(out_factor) if a != axis)
        halo = conv.dilation[axis] * (conv.kernel_size[axis] - 1)
        window = (factor[axis] + halo) * cs_in * conv.in_channels
        out = out_factor[axis] * cs_out * conv.out_channels
        step_peak = max(step_peak, window + out)
        kept += halo * cs_in * conv.in_channels
        factor = out_factor
    per_plane = (step_peak + kept) * cross * e * _DECODE_SLACK
    fixed = _param_bytes(vae.decoder, e) + _param_bytes(vae.quantizer, 4)
    # the chunk's cross-section at full resolution, once more for the copy to the output buffer
    fixed_per_plane = math.prod(factor) * cross * 4
    return MemoryCost(fixed=fixed, per_unit=per_plane + fixed_per_plane, unit="latent plane of chunk",
                      source="analytic")


# ---- measured costs (CUDA) ------------------------------------------------------------------------

def _cache_file() -> Path:
    root = Path(os.environ.get("MEDGEN_CACHE") or Path.home() / ".cache" / "medgen_rt")
    return root / "memory_costs.json"


def _model_key(module: nn.Module, device: torch.device, dtype: torch.dtype, extra: str) -> str:
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in module.state_dict().items())
    digest = hashlib.sha256(f"{type(module).__name__}|{shapes}|{extra}".encode()).hexdigest()[:16]
    return f"{torch.cuda.get_device_name(device)}|{dtype}|{digest}"


def _cached(key: str) -> Optional[MemoryCost]:
    try:
        entry = json.loads(_cache_file().read_text()).get(key)
    except (OSError, ValueError):
        return None
    return MemoryCost(**entry) if entry else None


def _store(key: str, cost: MemoryCost) -> None:
    path = _cache_file()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = asdict(cost)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measure again next time


def _peak_of(fn, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_decode_cost(vae: nn.Module, latent_spatial: Sequence[int], axis: int) -> MemoryCost:
    """Peak CUDA memory of streamed decoding (chunk 1 and 2 on a probe of the real
    cross-section, capped at 32 latent voxels per axis), fitted as fixed + per_plane."""
    from medgen_rt.sampling.decode import streamed_decode

    device = next(vae.parameters()).device
    probe = [min(s, 32) for s in latent_spatial]
    probe[axis] = 8
    units = math.prod(s for a, s in enumerate(probe) if a != axis)
    key = _model_key(vae.decoder, device, torch.float32, f"decode|axis{axis}|{probe}")
    cached = _cached(key)
    if cached:
        return cached
    z = torch.zeros((1, vae.config.embedding_dim, *probe), device=device)
    # the output buffer is pinned CPU memory, as in sampling: not part of the GPU peak
    peaks = [_peak_of(lambda c=c: streamed_decode(vae, z, axis=axis, chunk=c), device) for c in (1, 2)]
    per_plane = max(peaks[1] - peaks[0], 1)
    # weights were allocated before the probe: add them; the rest of chunk 1's peak is per-step workspace
    fixed = _param_bytes(vae.decoder, 4) + max(peaks[0] - per_plane, 0)
    cross = math.prod(s for a, s in enumerate(latent_spatial) if a != axis)
    cost = MemoryCost(fixed=fixed, per_unit=per_plane / units * cross, unit="latent plane of chunk",
                      source=f"measured on {torch.cuda.get_device_name(device)}")
    _store(key, cost)
    return cost


def measure_denoise_cost(net: nn.Module, latent_shape: Sequence[int], dtype: torch.dtype,
                         call) -> MemoryCost:
    """Peak CUDA memory of one denoiser call at two probe sizes, fitted per unit.
    call(*inputs) runs the denoiser on denoiser_inputs (made before the peak is taken:
    the sampler holds them)."""
    device = next(net.parameters()).device
    # v2: a ControlNet measured with its mask (v1 entries ran the U-Net alone)
    key = _model_key(net, device, dtype, f"denoise-v2|{tuple(latent_shape)}")
    cached = _cached(key)
    if cached:
        return cached
    step = _probe_spatial(net, latent_shape, divisor=4, floor=1)
    shapes = [step, tuple(min(2 * s, full) for s, full in zip(step, latent_shape[1:]))]
    peaks, units = [], []
    for spatial in shapes:
        inputs = denoiser_inputs(net, latent_shape[0], spatial, device, dtype)
        with torch.no_grad():
            peaks.append(_peak_of(lambda: call(*inputs), device))
        units.append(denoiser_units(net, (latent_shape[0],) + spatial))
    per_unit = max(peaks[1] - peaks[0], 1) / max(units[1] - units[0], 1)
    cost = MemoryCost(fixed=_param_bytes(net, torch.finfo(dtype).bits // 8), per_unit=per_unit,
                      unit="token" if _dit_of(net) is not None else "latent voxel",
                      source=f"measured on {torch.cuda.get_device_name(device)}")
    _store(key, cost)
    return cost


# ---- the plan ---------------------------------------------------------------------------------------

def denoiser_dtype_for(device) -> torch.dtype:
    """bf16 on CUDA (the published models train in bf16 autocast), float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * GIB


def decoder_input_spatial(vae: nn.Module, latent_shape: Sequence[int]) -> tuple:
    """The spatial shape the 3D decoder network sees: the latent's, or one cine slice's."""
    from medgen_rt.models.vqgan import CineVQGAN

    spatial = tuple(latent_shape[1:])
    if isinstance(vae, CineVQGAN) and len(spatial) == vae.config.spatial_dims + 1:
        return spatial[1:]
    return spatial


def condition_bytes(net: nn.Module, vae: nn.Module, latent_shape: Sequence[int], guidance: bool,
                    dtype: torch.dtype) -> int:
    """Device bytes of one volume's mask as the sampler holds it (sampling/api.py,
    diffusion/samplers.py), all in the network's dtype: the mask all along (the network's cast
    is then no copy); with guidance also its null (zeros of its shape) and, per call, the two
    concatenated. The mask is at image resolution: MedLoRD's six labels at 512x512x256 are
    0.75 GiB in bfloat16."""
    channels = getattr(net, "mask_channels", None)
    if not channels:
        return 0
    factor = getattr(net, "mask_downsample", None)
    factors = (factor,) * (len(latent_shape) - 1) if factor else vae.downsample_factor
    elements = channels * math.prod(s * f for s, f in zip(latent_shape[1:], factors))
    return elements * (torch.finfo(dtype).bits // 8) * (4 if guidance else 1)


def plan_sampling(net: nn.Module, vae: nn.Module, latent_shape: Sequence[int], n: int = 1,
                  guidance: bool = False, max_vram=None, device="cpu", measure: bool = True,
                  denoiser_dtype: Optional[torch.dtype] = None) -> SamplingPlan:
    """Plan a sampling run. latent_shape: (C, *spatial) of one volume; n volumes;
    guidance: a classifier-free guidance pass doubles the denoiser batch. The DiT
    runs in bf16 on CUDA (float32 elsewhere). The largest batch (up to 8) and decode
    chunk that fit max_vram are chosen (without it, the chunk fits a quarter of the
    RAM on the CPU, 90% of the GPU's memory on CUDA); a plan that cannot fit
    max_vram raises ValueError.
    """
    device = torch.device(device)
    limit = parse_memory(max_vram)
    dtype = denoiser_dtype or denoiser_dtype_for(device)
    units = denoiser_units(net, latent_shape)
    measured_ok = measure and device.type == "cuda" and next(net.parameters()).device.type == "cuda"
    if measured_ok:
        # run as sampling will: weights in the planned dtype; a ControlNet with its mask, TGCA
        # without (its adapter's share is small next to the blocks')
        takes_mask = "mask" in inspect.signature(net.forward).parameters
        weights_dtype = next(net.parameters()).dtype
        net.to(dtype)

        def call(x, t, mask=None):
            return net(x, t, mask) if takes_mask else net(x, t)

        try:
            denoise_cost = measure_denoise_cost(net, latent_shape, dtype, call)
        finally:
            net.to(weights_dtype)
    else:
        denoise_cost = analytic_denoise_cost(net, latent_shape, dtype)
    passes = 2 if guidance else 1
    # the sampler's tensors per volume: x, the model output and the update (float32), the mask
    held_bytes = math.prod(latent_shape) * 4 * 3 + condition_bytes(net, vae, latent_shape, guidance, dtype)

    def denoise_peak(batch):
        return denoise_cost.bytes(units * batch * passes) + held_bytes * batch

    batch = max(1, min(n, 8))
    if limit is not None:
        while batch > 1 and denoise_peak(batch) > limit:
            batch -= 1
    dec_spatial = decoder_input_spatial(vae, latent_shape)
    axis = max(range(len(dec_spatial)), key=lambda a: dec_spatial[a])
    if measure and device.type == "cuda" and next(vae.parameters()).device.type == "cuda":
        decode_cost = measure_decode_cost(vae, dec_spatial, axis)
    else:
        decode_cost = analytic_decode_cost(vae, dec_spatial, axis)
    latent_in = math.prod(latent_shape) * 4
    # without max_vram: a quarter of the CPU's RAM, or 90% of the GPU's memory
    budget = limit if limit is not None else _default_budget(device)
    chunk = dec_spatial[axis]  # the whole axis in one step when it fits: no per-step overhead
    while chunk > 1 and decode_cost.bytes(chunk) + latent_in > budget:
        chunk = (chunk + 1) // 2
    peaks = {"denoise": denoise_peak(batch), "decode": decode_cost.bytes(chunk) + latent_in}
    plan = SamplingPlan(device=str(device), max_vram_bytes=limit, denoiser_dtype=str(dtype).replace("torch.", ""),
                        batch=batch, decode_axis=axis, decode_chunk=chunk, predicted_peak_bytes=peaks,
                        costs={"denoise": asdict(denoise_cost), "decode": asdict(decode_cost)},
                        sampler_bytes=held_bytes * batch)
    if limit is not None:
        over = {k: round(v / GIB, 2) for k, v in peaks.items() if v > limit}
        if over:
            raise ValueError(f"max_vram (--max-vram) {limit / GIB:.2f} GiB is too small: predicted peak {over} "
                             "GiB even with batch 1 and one latent plane per decode step")
    return plan
