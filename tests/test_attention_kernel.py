"""The attention op beyond the generic harness: the DiT gives the same output and
gradients with the Triton kernel as with the reference, qk-norm and RoPE
parameters get their gradients, odd head dims, argument checks, the flash_attn
wrapper's layout handling, and (GPU only) long sequences without an N x N buffer.
On the CPU the Triton kernel runs in its interpreter (tests/conftest.py)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from medgen_rt import ops
from medgen_rt.models.dit import DiT, dit_config

# The module, not the op: medgen_rt.ops re-exports the op under the same name.
attention_mod = importlib.import_module("medgen_rt.ops.attention")
OP = ops.get_op("attention")


def _require_triton(device="cpu"):
    reason = OP.availability(device)["triton"]
    if reason is not None:
        pytest.skip(f"triton on {device}: {reason}")


def _randomise(model, seed=0):
    """Non-zero values everywhere (the zero-initialised adaLN/output would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(p.shape[-1], 1))) + 0.01)
    return model


def _route_attention(monkeypatch, backend):
    """Every other op on the reference; attention on `backend` (an explicit backend= wins)."""
    monkeypatch.setenv("MEDGEN_BACKEND", "reference")
    monkeypatch.setattr(ops, "attention", lambda *a, **kw: OP(*a, backend=backend, **kw))


@pytest.mark.parametrize("rope,qk_norm", [(False, False), (True, True)])
def test_dit_same_output_and_gradients_reference_vs_triton(rope, qk_norm, monkeypatch):
    _require_triton()
    cfg = dit_config("dit3d-tiny", rope=rope, qk_norm=qk_norm)
    ref_model = _randomise(DiT(cfg)).train()  # the tiny preset has no dropout: train() is deterministic
    tri_model = DiT(cfg).train()
    tri_model.load_state_dict(ref_model.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, *cfg.input_size, generator=g)
    t = torch.tensor([11, 240])
    outs = []
    for backend, model in (("reference", ref_model), ("triton", tri_model)):
        _route_attention(monkeypatch, backend)
        out = model(x, t)
        out.square().mean().backward()
        outs.append(out.detach())
    scale = outs[0].abs().max().item()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * scale)
    for (name, p_ref), p_tri in zip(ref_model.named_parameters(), tri_model.parameters()):
        torch.testing.assert_close(p_tri.grad, p_ref.grad, rtol=1e-4, atol=1e-5 * p_ref.grad.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
    if qk_norm:
        assert ref_model.blocks[0].attn.q_norm.weight.grad.abs().sum() > 0


def test_dit_qk_norm_keeps_checkpoint_names_and_module_semantics():
    """The op's q_norm/k_norm equal applying the nn.LayerNorm modules first (the old path)."""
    model = _randomise(DiT(dit_config("dit3d-tiny", qk_norm=True, rope=True))).eval()
    keys = model.state_dict().keys()
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.q_norm.bias", "blocks.0.attn.k_norm.weight",
            "blocks.0.attn.k_norm.bias"} <= set(keys)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, attn.head_dim, generator=g) for _ in range(3))
    from medgen_rt.models.embeddings import rope_tables

    rope = rope_tables(attn.head_dim, (3, 2, 2))
    with torch.no_grad():
        fused = OP(q, k, v, rope, q_norm=attn._norm_args(attn.q_norm), k_norm=attn._norm_args(attn.k_norm),
                   backend="reference")
        separate = OP(attn.q_norm(q), attn.k_norm(k), v, rope, backend="reference")
    torch.testing.assert_close(fused, separate, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_rope_parameters_get_the_reference_gradients(dtype):
    _require_triton()
    B, H, N, d = 1, 2, 19, 16
    g = torch.Generator().manual_seed(5)

    def make():
        q, k, v = (torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3))
        qw, qb, kw = ((1 + 0.3 * torch.randn(d, generator=g)).to(dtype) for _ in range(3))
        angles = torch.rand(N, d // 2, generator=g) * 6
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        return [t.requires_grad_(True) for t in (q, k, v, qw, qb, kw, cos, sin)]

    ref_in = make()
    tri_in = [t.detach().clone().requires_grad_(True) for t in ref_in]
    dout = torch.randn(B, H, N, d, generator=g).to(dtype)
    for backend, (q, k, v, qw, qb, kw, cos, sin) in (("reference", ref_in), ("triton", tri_in)):
        out = OP(q, k, v, (cos, sin), q_norm=(qw, qb, 1e-6), k_norm=(kw, None, 1e-5), backend=backend)
        out.backward(dout)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(["q", "k", "v", "qw", "qb", "kw", "cos", "sin"], tri_in, ref_in):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=tol,
                                   atol=tol * b.grad.abs().max().item(), msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 1, 7, 5), (1, 2, 33, 3), (1, 1, 40, 130)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_odd_head_dims_single_token_and_long_heads(shape, qk_norm):
    _require_triton()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    d = shape[-1]
    norms = {}
    if qk_norm:  # halves of unequal width (d odd) share one LayerNorm
        norms = {"q_norm": (1 + torch.randn(d, generator=g) * 0.2, torch.randn(d, generator=g) * 0.2, 1e-6),
                 "k_norm": (None, torch.randn(d, generator=g) * 0.2, 1e-5)}
    expected = OP(q, k, v, backend="reference", **norms)
    actual = OP(q, k, v, backend="triton", **norms)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_transform_in_loop_and_in_prepass_agree(dtype):
    """k's norm and RoPE run in the key loop (one query block) or in a prepass kernel (several):
    both round k once, where the reference does, so they give the same numbers."""
    _require_triton()
    from medgen_rt.kernels.attention import forward

    B, H, N, d = 1, 2, 40, 16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3))
    angles = torch.rand(N, d // 2, generator=g) * 6
    rope = (torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    norm = ((1 + 0.2 * torch.randn(d, generator=g)).to(dtype), (0.2 * torch.randn(d, generator=g)).to(dtype), 1e-6)
    in_loop = forward(q, k, v, rope, norm, norm, k_prepass=False)
    prepass = forward(q, k, v, rope, norm, norm, k_prepass=True)
    torch.testing.assert_close(prepass, in_loop, rtol=0, atol=0)
    expected = OP(q, k, v, rope, q_norm=norm, k_norm=norm, backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(prepass.double(), expected.double(), rtol=tol, atol=tol * expected.abs().max().item())


def test_triton_output_reshapes_to_tokens_without_a_copy():
    _require_triton()
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    out = OP(q, k, v, backend="triton")
    assert out.shape == (2, 3, 10, 8)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, d) in memory: the DiT's reshape is a view


def test_empty_sequence():
    _require_triton()
    q = torch.randn(1, 2, 0, 8)
    assert OP(q, q, q, backend="triton").shape == (1, 2, 0, 8)


def test_triton_declines_dropout():
    _require_triton()
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ops.BackendUnavailableError, match="dropout"):
        OP(q, q, q, None, 0.1, backend="triton")
    assert OP.select((q, q, q, None, 0.1), {})[0] == "reference"


@pytest.mark.parametrize("norm,match", [
    ((torch.ones(7), None, 1e-6), "weight must be"),
    ((None, torch.zeros(8), 0.0), "eps must be positive"),
    ((torch.ones(8), torch.zeros(8)), "must be None or"),
])
def test_bad_qk_norm_is_rejected(norm, match):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=match):
        OP(q, q, q, q_norm=norm, backend="reference")


def test_mismatched_dtypes_are_rejected():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="share a dtype"):
        OP(q, q, q.half(), backend="reference")


def test_flash_attn_wrapper_layout_with_a_stand_in(monkeypatch):
    """The flash_attn backend's own code (norm, RoPE, layout) against the reference, with
    flash_attn_func replaced by an SDPA stand-in that checks what flash-attn would be given."""
    seen = {}

    def fake_flash_attn_func(q, k, v, dropout_p=0.0):
        seen["shape"], seen["stride_d"] = tuple(q.shape), q.stride(-1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=dropout_p)
        return out.transpose(1, 2)

    monkeypatch.setattr(attention_mod, "_flash_attn_func", lambda: fake_flash_attn_func)
    B, H, N, d = 2, 3, 11, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    angles = torch.rand(N, d // 2, generator=g)
    rope = (torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    norm = (1 + torch.randn(d, generator=g) * 0.2, torch.randn(d, generator=g) * 0.2, 1e-6)
    out = attention_mod.attention_flash_attn(q, k, v, rope, 0.0, norm, norm)
    expected = attention_mod.attention_reference(q, k, v, rope, 0.0, norm, norm)
    assert seen == {"shape": (B, N, H, d), "stride_d": 1}
    torch.testing.assert_close(out, expected)
    reason = attention_mod._flash_attn_supports(q, k, v)
    assert reason is not None and "float16 or bfloat16" in reason


# ---- GPU only ---------------------------------------------------------------------------

def _cuda_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _require_triton("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_long_sequence_without_an_n_by_n_buffer(d):
    """N = 16384 tokens (a 512x512x256 CT at ct-ds8, patch 2): the scores alone would be 1 GiB
    in float32; the kernel's extra memory must stay at the output's size."""
    _cuda_triton()
    B, H, N = 1, 2, 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    with torch.no_grad():  # compile and autotune (its timing buffers) outside the measurement
        OP(q, k, v, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = OP(q, k, v, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 2 * out.numel() * out.element_size() + (1 << 20)
    expected = OP(q, k, v, backend="reference")
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dit_b_shape_with_rope_and_qk_norm_on_gpu(dtype):
    """DiT-B heads (12 x 64) on 4096 tokens with RoPE tables of a 3D grid and qk-norm."""
    _cuda_triton()
    from medgen_rt.models.embeddings import rope_tables

    B, H, N, d = 2, 12, 4096, 64
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", generator=g).to(dtype) for _ in range(3))
    cos, sin = (t.cuda() for t in rope_tables(d, (16, 16, 16)))
    w = (1 + 0.2 * torch.randn(d, device="cuda", generator=g)).to(dtype)
    norm = (w, 0.1 * w, 1e-6)
    expected = OP(q, k, v, (cos, sin), q_norm=norm, k_norm=norm, backend="reference")
    actual = OP(q, k, v, (cos, sin), q_norm=norm, k_norm=norm, backend="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * expected.abs().max().item())
