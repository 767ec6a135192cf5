"""Decoding a latent piece by piece, so that the decoder's peak memory depends on
the piece, not the volume, while the result equals the full-volume decode.

Two ways, both writing through the tile_blend op into an output buffer that can
live in pinned CPU memory:

- streamed_decode (the default for medgen_rt's VQ-GANs): the latent is fed to
  the decoder in chunks along one axis; every convolution keeps only the few
  input planes its next outputs still need, so nothing is computed twice and
  only a slab of each layer's activations is ever held.
- tiled_decode (any decoder given as a callable, e.g. an ONNX session): tiles
  with a halo covering the decoder's receptive field, planned by
  medgen_rt.runtime.tiling (shared with the ONNX engine). The halo is decoded
  twice, so this costs more time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medgen_rt import ops
from medgen_rt.runtime.tiling import plan_tiles


@dataclass(frozen=True)
class DecoderGeometry:
    """How a decoder maps latent axes to output axes.

    factor[i], halo[i]: output voxels per latent voxel and the receptive-field
    radius (latent voxels) along latent spatial axis i; output_axis[i]: which output
    spatial axis latent axis i becomes (the cine decoder moves slices Z)."""

    factor: tuple
    halo: tuple
    output_axis: tuple
    out_channels: int

    def output_shape(self, latent_spatial: Sequence[int]) -> tuple:
        out = [0] * len(latent_spatial)
        for i, n in enumerate(latent_spatial):
            out[self.output_axis[i]] = n * self.factor[i]
        return tuple(out)


def decoder_geometry(model) -> DecoderGeometry:
    """Geometry of a medgen_rt VQ-GAN's decoder, from its layers (not guessed)."""
    from medgen_rt.models.vqgan import CineVQGAN, decoder_receptive_field

    factor = tuple(int(f) for f in model.downsample_factor)
    halo = tuple(int(r) for r in decoder_receptive_field(model))
    channels = model.config.out_channels
    if isinstance(model, CineVQGAN):
        # latent (Z, X', Y', T') -> output (X, Y, Z, T); slices decode independently: no halo on Z
        return DecoderGeometry(factor=(1,) + factor, halo=(0,) + halo, output_axis=(2, 0, 1, 3),
                               out_channels=channels)
    return DecoderGeometry(factor=factor, halo=halo, output_axis=tuple(range(len(factor))), out_channels=channels)


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, geometry: DecoderGeometry,
                 core: Sequence[int], out_device: str = "cpu", pin_memory: Optional[bool] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Decode `latent` (B, C, *L) tile by tile; returns (B, out_channels, *output spatial) float32.

    decode: the decoder, latent tile -> image tile. core: largest core tile in latent
    voxels per axis. The output buffer is on out_device (pinned CPU memory when the
    latent is on a GPU, unless pin_memory=False). progress(done, total) after each tile.
    """
    spatial = tuple(latent.shape[2:])
    if len(spatial) != len(geometry.factor):
        raise ValueError(f"tiled_decode: latent has {len(spatial)} spatial axes, the decoder {len(geometry.factor)}")
    tiles = plan_tiles(spatial, core, geometry.halo, geometry.factor)
    out_spatial = geometry.output_shape(spatial)
    if pin_memory is None:
        pin_memory = latent.device.type == "cuda" and str(out_device) == "cpu"
    out = torch.zeros((latent.shape[0], geometry.out_channels) + out_spatial, dtype=torch.float32,
                      device=out_device, pin_memory=bool(pin_memory))
    for done, tile in enumerate(tiles, 1):
        lat = latent[(slice(None), slice(None)) + tile.latent_slices()]
        with torch.no_grad():
            decoded = decode(lat)
        crop = [slice(None)] * len(out_spatial)
        region = [slice(None)] * len(out_spatial)
        for i, (c, o) in enumerate(zip(tile.crop_slices(), tile.output_slices())):
            crop[geometry.output_axis[i]] = c
            region[geometry.output_axis[i]] = o
        # cores are disjoint and exact: unit weights, nothing to normalise
        ops.tile_blend(out, None, decoded[(slice(None), slice(None)) + tuple(crop)], tuple(region))
        if progress is not None:
            progress(done, len(tiles))
    return out


# ---- streamed decoding ---------------------------------------------------------------------

class _StreamedConv:
    """A Conv or ConvTranspose layer run chunk by chunk along tensor dim `dim`.

    Holds the input planes received but still needed by later outputs; each push
    emits the output planes whose inputs have all arrived (after the last input,
    all remaining ones), at most `max_out` at a time so that the pipeline's lag is
    drained in steps, not in one volume-sized burst. Zero padding along `dim` is
    applied explicitly at the volume's ends, so the chunks concatenate to exactly
    the layer's full output.
    """

    def __init__(self, conv: nn.Module, dim: int, n_in: int, max_out: int):
        a = dim - 2
        self.dim, self.n_in, self.max_out = dim, n_in, max_out
        self.k, self.s, self.d, self.p = conv.kernel_size[a], conv.stride[a], conv.dilation[a], conv.padding[a]
        self.transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        padding = list(conv.padding)
        padding[a] = 0
        n = len(conv.kernel_size)
        span = self.d * (self.k - 1)
        if self.transposed:
            self.n_out = (n_in - 1) * self.s - 2 * self.p + span + conv.output_padding[a] + 1
            output_padding = list(conv.output_padding)
            output_padding[a] = 0  # the planes it adds are produced by zero input planes past the end
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
            self.run = lambda x: fn(x, conv.weight, conv.bias, conv.stride, padding, output_padding, conv.groups,
                                    conv.dilation)
        else:
            self.n_out = (n_in + 2 * self.p - span - 1) // self.s + 1
            fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
            self.run = lambda x: fn(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
        self.buffer: Optional[torch.Tensor] = None
        self.buffer_start = 0  # input index of buffer's first plane
        self.received = 0
        self.emitted = 0

    def _inputs_for(self, oa: int, ob: int) -> tuple:
        """Input planes [ia, ib) that output planes [oa, ob) depend on (may reach past the ends)."""
        k, s, d, p = self.k, self.s, self.d, self.p
        if self.transposed:  # output o = i*s - p + j*d, j < k
            ia = min(-((d * (k - 1) - oa - p) // s), (oa + p) // s)
            return ia, (ob - 1 + p) // s + 1
        return oa * s - p, (ob - 1) * s - p + d * (k - 1) + 1

    def _ready(self, final: bool) -> int:
        r, k, s, d, p = self.received, self.k, self.s, self.d, self.p
        if final:
            n = self.n_out
        else:
            n = r * s - p if self.transposed else (r - 1 + p - d * (k - 1)) // s + 1
        return max(self.emitted, min(n, self.n_out, self.emitted + self.max_out))

    @property
    def done(self) -> bool:
        return self.emitted == self.n_out

    def push(self, x: Optional[torch.Tensor], final: bool) -> Optional[torch.Tensor]:
        """x: the next input planes (or None); final: no input planes follow."""
        dim = self.dim
        if x is not None and x.shape[dim]:
            self.buffer = x if self.buffer is None else torch.cat([self.buffer, x], dim=dim)
            self.received += x.shape[dim]
        if final and self.received != self.n_in:
            raise RuntimeError(f"streamed layer got {self.received} of {self.n_in} input planes")
        oa, ob = self.emitted, self._ready(final)
        if ob <= oa:
            return None
        ia, ib = self._inputs_for(oa, ob)
        lo, hi = max(ia, 0), min(ib, self.n_in)
        window = self.buffer.narrow(dim, lo - self.buffer_start, hi - lo)
        if lo - ia or ib - hi:
            pad = [0] * (2 * (window.dim() - dim))
            pad[-2:] = [lo - ia, ib - hi]
            window = F.pad(window, pad)
        y = self.run(window)
        if self.transposed:  # window output index j is output plane j + ia*s - p
            y = y.narrow(dim, oa - ia * self.s + self.p, ob - oa)
        self.emitted = ob
        keep_from = self._inputs_for(ob, ob + 1)[0] if ob < self.n_out else self.received
        drop = min(max(0, keep_from - self.buffer_start), self.buffer.shape[dim])
        if drop:
            self.buffer = self.buffer.narrow(dim, drop, self.buffer.shape[dim] - drop)
            self.buffer_start += drop
        return y


class _StreamedConvBlock:
    def __init__(self, block, dim: int, n_in: int, max_out: int):
        self.conv = _StreamedConv(block.conv, dim, n_in, max_out)
        self.act = block.act
        self.n_out = self.conv.n_out

    @property
    def done(self) -> bool:
        return self.conv.done

    def push(self, x, final):
        y = self.conv.push(x, final)
        return F.relu(y, inplace=True) if y is not None and self.act else y


class _StreamedResidual:
    """relu(x + conv2(relu(conv1(x)))) with the skip planes held until conv2 catches up."""

    def __init__(self, unit, dim: int, n_in: int, max_out: int):
        self.dim = dim
        self.conv1 = _StreamedConvBlock(unit.conv1, dim, n_in, max_out)
        self.conv2 = _StreamedConvBlock(unit.conv2, dim, self.conv1.n_out, max_out)
        if self.conv2.n_out != n_in:
            raise NotImplementedError("a residual unit that changes the size along the streamed axis")
        self.n_out = n_in
        self.skip: list = []

    @property
    def done(self) -> bool:
        return self.conv2.done

    def push(self, x, final):
        if x is not None and x.shape[self.dim]:
            self.skip.append(x)
        y = self.conv2.push(self.conv1.push(x, final), self.conv1.done)
        if y is None:
            return None
        skip = torch.cat(self.skip, dim=self.dim) if len(self.skip) > 1 else self.skip[0]
        n = y.shape[self.dim]
        rest = skip.shape[self.dim] - n
        self.skip = [skip.narrow(self.dim, n, rest)] if rest else []
        return F.relu(y.add_(skip.narrow(self.dim, 0, n)), inplace=True)


class _Pointwise:
    def __init__(self, module, dim: int, n_in: int):
        self.module, self.dim, self.n_out, self.emitted = module, dim, n_in, 0

    @property
    def done(self) -> bool:
        return self.emitted == self.n_out

    def push(self, x, final):
        if x is None:
            return None
        self.emitted += x.shape[self.dim]
        return self.module(x)


def _streamed_stages(network: nn.Module, dim: int, n_first: int, chunk: int) -> list:
    """Streaming stages for a medgen_rt VQ-GAN Encoder or Decoder (its `blocks`)."""
    from medgen_rt.models.vqgan import ConvBlock, ResidualUnit

    stages = []
    n_in = n_first
    for block in network.blocks:
        # a stage may emit about what one chunk of input planes becomes at its resolution
        n_out = _StreamedConvBlock(block, dim, n_in, 1).n_out if isinstance(block, ConvBlock) else n_in
        max_out = -(-chunk * n_out // n_first) + 1
        if isinstance(block, ConvBlock):
            stage = _StreamedConvBlock(block, dim, n_in, max_out)
        elif isinstance(block, ResidualUnit):
            stage = _StreamedResidual(block, dim, n_in, max_out)
        elif isinstance(block, (nn.Tanh, nn.Sigmoid, nn.Identity)):
            stage = _Pointwise(block, dim, n_in)
        else:
            raise NotImplementedError(f"streaming does not know the layer {type(block).__name__}")
        stages.append(stage)
        n_in = stage.n_out
    return stages


def stream_network(network: nn.Module, latent: torch.Tensor, dim: int, chunk: int,
                   emit: Callable[[int, torch.Tensor], None]) -> None:
    """Run a medgen_rt VQ-GAN ``Decoder`` (or ``Encoder``) on `latent` (N, C, *S) chunk
    by chunk along tensor dim `dim`, `chunk` input planes at a time; emit(start, planes)
    receives the output in order, planes [start, start + n) along `dim`. Eval mode."""
    if network.training:
        raise ValueError("streaming needs the network in eval mode (dropout would differ per chunk)")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 plane, got {chunk}")
    n = latent.shape[dim]
    stages = _streamed_stages(network, dim, n, chunk)
    total = stages[-1].n_out
    written = 0

    def feed(x, last_input):
        nonlocal written
        final = last_input
        for stage in stages:
            x = stage.push(x, final)
            if x is None and not final:
                return
            final = stage.done  # the next stage's input is complete once this stage has emitted all
        if x is not None:
            emit(written, x)
            written += x.shape[dim]

    with torch.no_grad():
        for start in range(0, n, chunk):
            feed(latent.narrow(dim, start, min(chunk, n - start)), start + chunk >= n)
        while not stages[-1].done:  # drain the pipeline's lag, a bounded step at a time
            feed(None, True)
    if written != total:
        raise RuntimeError(f"streaming emitted {written} of {total} planes")


def streamable(model) -> bool:
    """True when `model` is a medgen_rt VQ-GAN whose decoder streamed_decode understands."""
    from medgen_rt.models.vqgan import VQGAN3D

    if not isinstance(model, VQGAN3D):
        return False
    try:
        _streamed_stages(model.decoder, 2, 8, 1)
    except NotImplementedError:
        return False
    return True


def streamed_decode(model, latent: torch.Tensor, axis: Optional[int] = None, chunk: int = 2,
                    out_device: str = "cpu", pin_memory: Optional[bool] = None, slices_per_pass: Optional[int] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Decode `latent` with a medgen_rt VQ-GAN, streaming along one latent axis; equals
    ``model.decode(latent)`` (float32) with a fraction of its memory and no recomputation.

    latent: (B, D, *L) for a VQGAN3D, (B, D, Z, X', Y', T') for a CineVQGAN (each slice
    is streamed, `slices_per_pass` slices at a time; default the model's
    max_slices_per_pass, else all). axis: the axis of the decoder's input (0 = the first
    spatial axis, for cine of the (X', Y', T') slice) to stream along; default the
    longest, which makes each chunk's cross-section smallest. chunk: latent planes per
    step (memory grows with it, the per-call overhead shrinks). The output buffer is on
    out_device, pinned when the latent is on a GPU and the buffer on the CPU.
    progress(done, total) in output planes after each emitted chunk.
    """
    from medgen_rt.models.vqgan import CineVQGAN

    model_dims = model.config.spatial_dims
    cine = isinstance(model, CineVQGAN) and latent.dim() == model_dims + 3
    if latent.dim() != model_dims + 2 + int(cine):
        raise ValueError(f"streamed_decode: latent of shape {tuple(latent.shape)} does not fit the decoder "
                         f"({model_dims} spatial axes)")
    if cine:
        B, D, Z = latent.shape[:3]
        slices = latent.transpose(1, 2).reshape(B * Z, D, *latent.shape[3:])
    else:
        B, Z, slices = latent.shape[0], 1, latent
    spatial = tuple(slices.shape[2:])
    if axis is None:
        axis = max(range(model_dims), key=lambda a: spatial[a])
    if not 0 <= axis < model_dims:
        raise ValueError(f"streamed_decode: axis must be in 0..{model_dims - 1}, got {axis}")
    out_shape = model.output_shape(tuple(latent.shape))
    if pin_memory is None:
        pin_memory = latent.device.type == "cuda" and str(out_device) == "cpu"
    out = torch.zeros(out_shape, dtype=torch.float32, device=out_device, pin_memory=bool(pin_memory))
    per_pass = slices_per_pass or getattr(model, "max_slices_per_pass", None) or slices.shape[0]
    dim = 2 + axis
    passes = range(0, slices.shape[0], per_pass)
    planes_out = model.output_shape((1, slices.shape[1]) + spatial)[dim]
    total, done = planes_out * len(passes), 0
    for first in passes:
        group = slices[first:first + per_pass]

        def emit(start, planes, first=first):
            nonlocal done
            n = planes.shape[dim]
            region = [slice(0, size) for size in planes.shape[2:]]
            region[axis] = slice(start, start + n)
            if cine:  # slice j of the group is (b, z) = divmod(first + j, Z); it lands in out[b, :, ..., z, :]
                for j in range(planes.shape[0]):
                    b, z = divmod(first + j, Z)
                    ops.tile_blend(out[b:b + 1, :, :, :, z], None, planes[j:j + 1], tuple(region))
            else:
                ops.tile_blend(out, None, planes, tuple(region))
            done += n
            if progress is not None:
                progress(done, total)

        stream_network(model.decoder, group, dim, chunk, emit)
    return out


def streamed_encode(model, x: torch.Tensor, axis: Optional[int] = None, chunk: int = 16) -> torch.Tensor:
    """``model.encode(x)`` (before quantisation) for inputs too large to encode at once:
    the encoder streamed along one axis of its input, `chunk` image planes per step.
    x: (B, C, *S) for a VQGAN3D, (B, C, X, Y, Z, T) for a CineVQGAN (slices one at a time).
    Returns z_e on x's device, float32."""
    from medgen_rt.models.vqgan import CineVQGAN

    dims = model.config.spatial_dims
    if isinstance(model, CineVQGAN) and x.dim() == dims + 3:
        slices = [streamed_encode(model, x[:, :, :, :, z], axis, chunk) for z in range(x.shape[4])]
        return torch.stack(slices, dim=2)  # (B, D, Z, X', Y', T')
    if x.dim() != dims + 2 or x.shape[1] != model.config.in_channels:
        raise ValueError(f"streamed_encode: input of shape {tuple(x.shape)} does not fit the encoder "
                         f"({model.config.in_channels} channels, {dims} spatial axes)")
    spatial = tuple(x.shape[2:])
    if axis is None:
        axis = max(range(dims), key=lambda a: spatial[a])
    parts = []
    stream_network(model.encoder, x.float(), 2 + axis, chunk, lambda start, planes: parts.append(planes))
    return torch.cat(parts, dim=2 + axis)
