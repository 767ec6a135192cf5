"""The attention op's native backend (csrc/cpu/attention.cpp, csrc/cuda/attention.cu) beyond
the generic harness: a grid of sequence lengths, head dims, batch sizes, input layouts
(slices of a fused qkv projection, transposed and d-strided views), dtypes, qk-norm
variants and RoPE against the reference; gradients through the reference recompute;
the output layout; what the backend declines; and (GPU only) the CUDA kernel."""
from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

from medgen_rt import ops
from medgen_rt.models.dit import DiT, dit_config

attention_mod = importlib.import_module("medgen_rt.ops.attention")
OP = ops.get_op("attention")
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require_native(device="cpu"):
    reason = OP.availability(device)["native"]
    if reason is not None:
        pytest.skip(f"native on {device}: {reason}")


def _qkv(B, H, N, d, dtype, device, layout, g):
    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if layout == "packed":  # slices of one (B, N, 3 * H * d) projection, as the DiT's qkv linear gives
        qkv = randn(B, N, 3 * H * d).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)
    if layout == "transposed":  # (B, N, H, d) tensors seen as (B, H, N, d)
        return tuple(randn(B, N, H, d).transpose(1, 2) for _ in range(3))
    if layout == "d_strided":  # the head dim not contiguous (stride N), every other head of a wider tensor
        return tuple(randn(B, 2 * H, d, N)[:, ::2].transpose(2, 3) for _ in range(3))
    return tuple(randn(B, H, N, d) for _ in range(3))


def _norm(kind, d, dtype, device, g, eps):
    if kind == "none":
        return None
    w = (1 + 0.3 * torch.randn(d, generator=g)).to(device, dtype)
    b = (0.3 * torch.randn(d, generator=g)).to(device, dtype)
    return {"affine": (w, b, eps), "weight": (w, None, eps), "plain": (None, None, eps)}[kind]


def _rope(N, d, device, g):
    angles = torch.rand(N, d // 2, generator=g) * 6.0
    return torch.cat([angles.cos()] * 2, -1).to(device), torch.cat([angles.sin()] * 2, -1).to(device)


def _check(actual, expected, dtype, what=""):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    tol = TOL[dtype]
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * max(e.abs().max().item(), 1e-12),
                               msg=lambda m: f"{what}: {m}")


def _grid_case(N, d, dtype, device):
    """Every layout x qk-norm variant x RoPE on/off for one (N, d, dtype), batch 1 or 3 alternating."""
    g = torch.Generator().manual_seed(N * 1000 + d)
    combos = itertools.product(("contiguous", "packed", "transposed", "d_strided"),
                               ("none", "affine", "weight", "plain"), (False, True))
    for i, (layout, norm, rope) in enumerate(combos):
        B, H = (1, 2) if i % 2 == 0 else (3, 1)
        q, k, v = _qkv(B, H, N, d, dtype, device, layout, g)
        kwargs = {"q_norm": _norm(norm, d, dtype, device, g, 1e-6),
                  "k_norm": _norm("plain" if norm == "weight" else norm, d, dtype, device, g, 1e-5)}
        args = (q, k, v, _rope(N, d, device, g) if rope else None)
        with torch.no_grad():
            expected = OP(*args, backend="reference", **kwargs)
            actual = OP(*args, backend="native", **kwargs)
        _check(actual, expected, dtype, f"B={B} N={N} d={d} {layout} norm={norm} rope={rope}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("d", [32, 64, 80, 128])
@pytest.mark.parametrize("N", [1, 7, 33, 200])
def test_native_matches_reference_grid(N, d, dtype):
    _require_native()
    _grid_case(N, d, dtype, "cpu")


@pytest.mark.parametrize("shape", [(1, 1, 48, 64), (1, 1, 192, 64), (1, 1, 193, 64), (1, 2, 256, 64),
                                   (2, 1, 257, 32), (1, 1, 600, 128), (1, 1, 1000, 8), (2, 3, 97, 5)])
def test_native_block_boundaries_and_odd_head_dims(shape):
    """Sequence lengths at and just past the CPU kernel's query/key block sizes, several key
    blocks, and head dims that are not multiples of 8 (padded in the kernels)."""
    _require_native()
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    norm = (1 + 0.2 * torch.randn(shape[-1], generator=g), None, 1e-6)
    expected = OP(q, k, v, q_norm=norm, k_norm=norm, backend="reference")
    _check(OP(q, k, v, q_norm=norm, k_norm=norm, backend="native"), expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_native_large_logits_are_stable(dtype):
    """Scores in the hundreds (the online softmax rescales; the exp underflows cleanly)."""
    _require_native()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 300, 64, generator=g) for _ in range(3))
    q = (q * 12).to(dtype)
    k, v = k.to(dtype), v.to(dtype)
    _check(OP(q, k, v, backend="native"), OP(q, k, v, backend="reference"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_native_gradients_match_reference(dtype):
    """Forward by the kernel, backward by the reference recompute: every input gets its gradient."""
    _require_native()
    B, H, N, d = 2, 2, 37, 32
    g = torch.Generator().manual_seed(5)

    def make():
        q, k, v = (torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3))
        qw, qb, kw = ((1 + 0.3 * torch.randn(d, generator=g)).to(dtype) for _ in range(3))
        cos, sin = _rope(N, d, "cpu", g)
        return [t.requires_grad_(True) for t in (q, k, v, qw, qb, kw, cos, sin)]

    ref_in = make()
    nat_in = [t.detach().clone().requires_grad_(True) for t in ref_in]
    dout = torch.randn(B, H, N, d, generator=g).to(dtype)
    for backend, (q, k, v, qw, qb, kw, cos, sin) in (("reference", ref_in), ("native", nat_in)):
        out = OP(q, k, v, (cos, sin), q_norm=(qw, qb, 1e-6), k_norm=(kw, None, 1e-5), backend=backend)
        out.backward(dout)
    tol = TOL[dtype]
    for name, a, b in zip(["q", "k", "v", "qw", "qb", "kw", "cos", "sin"], nat_in, ref_in):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=tol,
                                   atol=tol * b.grad.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}")


def test_native_gradients_of_packed_qkv_views():
    """The DiT's case: q, k, v slices of one projection; the gradient reaches the projection."""
    _require_native()
    g = torch.Generator().manual_seed(9)
    base = torch.randn(2, 19, 3 * 2 * 16, generator=g)
    grads = []
    for backend in ("reference", "native"):
        x = base.clone().requires_grad_(True)
        q, k, v = x.view(2, 19, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        OP(q, k, v, backend=backend).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5 * grads[0].abs().max().item())


def test_dit_same_output_and_gradients_reference_vs_native(monkeypatch):
    _require_native()
    cfg = dit_config("dit3d-tiny", rope=True, qk_norm=True)
    g = torch.Generator().manual_seed(0)
    ref_model = DiT(cfg).train()
    with torch.no_grad():
        for p in ref_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(p.shape[-1], 1))) + 0.01)
    nat_model = DiT(cfg).train()
    nat_model.load_state_dict(ref_model.state_dict())
    x = torch.randn(2, cfg.in_channels, *cfg.input_size, generator=g)
    t = torch.tensor([11, 240])
    outs = []
    monkeypatch.setenv("MEDGEN_BACKEND", "reference")  # every other op on the reference
    for backend, model in (("reference", ref_model), ("native", nat_model)):
        monkeypatch.setattr(ops, "attention", lambda *a, backend=backend, **kw: OP(*a, backend=backend, **kw))
        out = model(x, t)
        out.square().mean().backward()
        outs.append(out.detach())
    scale = outs[0].abs().max().item()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * scale)
    for (name, p_ref), p_nat in zip(ref_model.named_parameters(), nat_model.parameters()):
        torch.testing.assert_close(p_nat.grad, p_ref.grad, rtol=1e-4, atol=1e-5 * p_ref.grad.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_native_output_is_token_major_and_inference_has_no_graph():
    _require_native()
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    out = OP(q, k, v, backend="native")
    assert out.shape == (2, 3, 10, 8)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, d) in memory: the DiT's reshape is a view
    assert out.grad_fn is None
    q.requires_grad_(True)
    assert OP(q, k, v, backend="native").grad_fn is not None


@pytest.mark.parametrize("shape", [(1, 2, 0, 8), (0, 2, 5, 8)])
def test_native_empty_inputs(shape):
    _require_native()
    q = torch.randn(*shape)
    assert OP(q, q, q, backend="native").shape == shape


def test_native_declines_and_auto_selection():
    _require_native()
    q = torch.randn(1, 1, 4, 8)
    assert OP.select((q, q, q), {})[0] == "native"  # the CPU default
    with pytest.raises(ops.BackendUnavailableError, match="dropout"):
        OP(q, q, q, None, 0.1, backend="native")
    assert OP.select((q, q, q, None, 0.1), {})[0] == "reference"
    big = torch.randn(1, 1, 4, 130)
    with pytest.raises(ops.BackendUnavailableError, match="head dims up to 128"):
        OP(big, big, big, backend="native")
    assert OP.select((big, big, big), {})[0] == "reference"
    with pytest.raises(ops.BackendUnavailableError, match="float32, float16 or bfloat16"):
        OP(q.double(), q.double(), q.double(), backend="native")


def test_native_takes_float64_tables_and_16bit_norm_parameters():
    """Tables and norm parameters in another float dtype are converted (to float32) for the kernel."""
    _require_native()
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 21, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    cos, sin = (t.double() for t in _rope(21, 16, "cpu", g))
    norm = ((1 + 0.2 * torch.randn(16, generator=g)).to(torch.bfloat16), None, 1e-6)
    expected = OP(q, k, v, (cos, sin), q_norm=norm, k_norm=norm, backend="reference")
    _check(OP(q, k, v, (cos, sin), q_norm=norm, k_norm=norm, backend="native"), expected, torch.bfloat16)


def test_native_extension_validates_attention_arguments():
    _require_native()
    from medgen_rt.ops import _native

    C_ = _native.native_module()
    d = _native.describe
    q = torch.randn(1, 2, 5, 8)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="k/v/out: shape"):
        C_.attention_forward(d(q), d(q[:, :1]), d(q), d(out), None, None, None, None, None, None, None, None, 0)
    with pytest.raises(ValueError, match="cos: must be float32"):
        C_.attention_forward(d(q), d(q), d(q), d(out), d(torch.ones(5, 8).half()), d(torch.ones(5, 8)),
                             None, None, None, None, None, None, 0)
    with pytest.raises(ValueError, match="give both RoPE tables"):
        C_.attention_forward(d(q), d(q), d(q), d(out), d(torch.ones(5, 8)), None, None, None, None, None, None,
                             None, 0)


# ---- GPU only ---------------------------------------------------------------------------

def _cuda_native():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _require_native("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("d", [32, 64, 80, 128])
@pytest.mark.parametrize("N", [1, 7, 33, 200])
def test_native_cuda_matches_reference_grid(N, d, dtype):
    _cuda_native()
    _grid_case(N, d, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_native_cuda_long_sequence_with_rope_and_qk_norm(dtype):
    """DiT-B heads on 4096 tokens, RoPE of a 3D grid and qk-norm, on torch's current stream."""
    _cuda_native()
    from medgen_rt.models.embeddings import rope_tables

    B, H, N, d = 2, 12, 4096, 64
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", generator=g).to(dtype) for _ in range(3))
    cos, sin = (t.cuda() for t in rope_tables(d, (16, 16, 16)))
    w = (1 + 0.2 * torch.randn(d, device="cuda", generator=g)).to(dtype)
    norm = (w, 0.1 * w, 1e-6)
    expected = OP(q, k, v, (cos, sin), q_norm=norm, k_norm=norm, backend="reference")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual = OP(q, k, v, (cos, sin), q_norm=norm, k_norm=norm, backend="native")
    torch.cuda.current_stream().wait_stream(stream)
    _check(actual, expected, dtype)


@pytest.mark.gpu
def test_native_cuda_gradients_match_reference():
    _cuda_native()
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 3, 50, 64, device="cuda", generator=g) for _ in range(3))
    grads = []
    for backend in ("reference", "native"):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        OP(*ins, backend=backend).square().sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
