"""The native patch_embed / unpatchify backends beyond the generic harness
(tests/test_op_backends.py runs them over tests/op_cases.py): which calls they
decline, 1 and 2 spatial axes, the extension's own argument checks, gradients
through a model-sized call, and the CUDA kernels where a GPU is present."""
from __future__ import annotations

import math

import pytest
import torch

from medgen_rt import ops
from medgen_rt.ops import _native

PE = ops.get_op("patch_embed")
UNP = ops.get_op("unpatchify")
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _require_native(device: str):
    reason = PE.availability(device)["native"]
    if reason is not None:
        pytest.skip(f"native on {device}: {reason}")


def _inputs(B, C, hidden, spatial, patch, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    K = C * math.prod(patch)
    N = math.prod(s // p for s, p in zip(spatial, patch))
    x = torch.randn(B, C, *spatial, generator=g).to(device, dtype)
    w = (torch.randn(hidden, K, generator=g) / K ** 0.5).to(device, dtype)
    b = torch.randn(hidden, generator=g).to(device, dtype)
    pos = torch.randn(N, hidden, generator=g).to(device, dtype)
    return x, w, b, pos


def _close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol,
                               atol=tol * max(expected.abs().max().item(), 1e-12))


def test_native_is_the_default_on_cpu():
    x, w, b, pos = _inputs(1, 8, 32, (4, 4, 4), (2, 2, 2))
    assert PE.select((x, w, b, (2, 2, 2), pos), {})[0] == "native"
    tokens = torch.randn(1, 8, 64)
    assert UNP.select((tokens, (2, 2, 2), (2, 2, 2), 8), {})[0] == "native"


@pytest.mark.parametrize("spatial,patch", [((12,), (3,)), ((6, 8), (2, 4)), ((5, 4), (1, 2))])
def test_one_and_two_spatial_axes(spatial, patch):
    _require_native("cpu")
    x, w, b, pos = _inputs(2, 3, 24, spatial, patch)
    _close(PE(x, w, b, patch, pos, backend="native"), PE(x, w, b, patch, pos, backend="reference"), torch.float32)
    grid = tuple(s // p for s, p in zip(spatial, patch))
    tokens = torch.randn(2, math.prod(grid), math.prod(patch) * 3)
    assert torch.equal(UNP(tokens, grid, patch, 3, backend="native"),
                       UNP(tokens, grid, patch, 3, backend="reference"))


def test_declines_what_the_kernels_cannot_take():
    x, w, b, pos = _inputs(2, 2, 16, (2, 2, 2, 2, 2), (1, 1, 1, 1, 2))
    why = PE.backends["native"].why_not("cpu", (x, w, b, (1, 1, 1, 1, 2), pos), {})
    assert why and "spatial axes" in why
    assert PE.select((x, w, b, (1, 1, 1, 1, 2), pos), {})[0] == "reference"

    x, w, b, pos = _inputs(2, 2, 16, (4, 4, 4), (2, 2, 2))
    per_sample = torch.randn(2, *pos.shape)
    assert "every sample" in PE.backends["native"].why_not("cpu", (x, w, b, (2, 2, 2), per_sample), {})
    assert "dtype" in PE.backends["native"].why_not("cpu", (x, w.half(), b, (2, 2, 2), pos), {})
    assert "dtype" in PE.backends["native"].why_not("cpu", (x, w, b.double(), (2, 2, 2), pos), {})
    tokens = torch.randn(1, 8, 16, dtype=torch.float64)
    assert "float32" in UNP.backends["native"].why_not("cpu", (tokens, (2, 2, 2), (1, 1, 2), 8), {})


def test_extension_checks_its_arguments():
    """The C++ side validates on its own; a mismatch is a ValueError naming the argument."""
    _require_native("cpu")
    C_ = _native.native_module()
    d = _native.describe
    x, w, b, pos = _inputs(1, 2, 16, (4, 4, 4), (2, 2, 2))
    out = torch.empty(1, 8, 16)
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        C_.patch_embed_forward(d(x), d(w), None, None, d(out), [3, 2, 2], 0)
    with pytest.raises(ValueError, match="weight"):
        C_.patch_embed_forward(d(x), d(w[:, :8]), None, None, d(out), [2, 2, 2], 0)
    with pytest.raises(ValueError, match="pos_embed: shape"):
        C_.patch_embed_forward(d(x), d(w), d(b), d(pos[:4]), d(out), [2, 2, 2], 0)
    with pytest.raises(ValueError, match="out: shape"):
        C_.patch_embed_forward(d(x), d(w), d(b), None, d(out[:, :4]), [2, 2, 2], 0)
    with pytest.raises(ValueError, match="1 to 4 spatial axes"):
        C_.unpatchify(d(torch.empty(1, 1, 2)), d(torch.empty(1, 1, 1, 1, 1, 1, 2)), [1, 1, 1, 1, 2], 0)
    with pytest.raises(ValueError, match="tokens: shape"):
        C_.unpatchify(d(torch.empty(1, 8, 15)), d(torch.empty(1, 2, 4, 4, 4)), [2, 2, 2], 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_the_reference_at_a_dit_like_size(dtype):
    """Every input requiring grad, as in training: 4D cine patch, 2 samples, a (1, N, hidden) table."""
    _require_native("cpu")
    x, w, b, pos = _inputs(2, 4, 96, (2, 8, 8, 4), (1, 4, 4, 2), dtype=dtype, seed=3)
    pos = pos[None]
    grads = {}
    for backend in ("reference", "native"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, pos)]
        out = PE(leaves[0], leaves[1], leaves[2], (1, 4, 4, 2), leaves[3], backend=backend)
        out = UNP(out[..., :64], (2, 2, 2, 2), (1, 4, 4, 2), 2, backend=backend)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for g_native, g_ref in zip(grads["native"], grads["reference"]):
        assert g_native.shape == g_ref.shape and g_native.dtype == g_ref.dtype
        _close(g_native, g_ref, dtype)


# ---- GPU only ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 384, (16, 16, 8), (2, 2, 2)), (1, 8, 768, (6, 16, 16, 8), (1, 4, 4, 2)),
                                   (3, 5, 70, (3, 6, 9), (1, 2, 3))])
def test_cuda_kernels_match_the_reference(shape, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _require_native("cuda")
    B, C, hidden, spatial, patch = shape
    x, w, b, pos = _inputs(B, C, hidden, spatial, patch, dtype=dtype, device="cuda")
    x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # not the dense layout
    _close(PE(x, w, b, patch, pos, backend="native"), PE(x, w, b, patch, pos, backend="reference"), dtype)
    _close(PE(x, w, None, patch, None, backend="native"), PE(x, w, None, patch, None, backend="reference"), dtype)
    grid = tuple(s // p for s, p in zip(spatial, patch))
    tokens = torch.randn(B, math.prod(grid), 2 * math.prod(patch) * C, device="cuda").to(dtype)[..., ::2]
    assert torch.equal(UNP(tokens, grid, patch, C, backend="native"),
                       UNP(tokens, grid, patch, C, backend="reference"))
