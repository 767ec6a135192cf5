"""The ops as torch.library custom ops: opcheck for every op, torch.compile(fullgraph=True)
of the tiny DiT3D, DiT4D and TGCA with the default backends (equal to eager, zero graph
breaks), the cached backend choice and its overrides (use_backend, MEDGEN_BACKEND,
backend=), and the native kernels following torch's thread count."""
from __future__ import annotations

import pytest
import torch

from medgen_rt import ops
from medgen_rt.ops import _native
from op_cases import OP_CASES

NATIVE = _native.unavailable_reason("cpu") is None


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("MEDGEN_BACKEND", raising=False)


def _cpu_backend(op) -> str:
    """The backend the registry picks for float32 CPU tensors: what opcheck should cover."""
    return "native" if NATIVE and "native" in op.backends else "reference"


def _small_inputs(op_name: str, requires_grad: bool):
    case = OP_CASES[op_name]
    args, kwargs = case.make_inputs(case.small_shapes[0], torch.float32, "cpu", case.layouts[0],
                                    torch.Generator().manual_seed(0))
    if requires_grad:
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    return args, kwargs


# ---- every op is a torch op that passes opcheck --------------------------------------------

def test_every_op_is_a_torch_op():
    for name in ops.list_ops():
        op = ops.get_op(name)
        assert op.torch_op is getattr(torch.ops.medgen, name).default, name


def _torch_op_backends():
    """(op, backend) for every kernel medgen::<op> can run on the CPU here (Triton in its
    interpreter where the test session turned it on), the reference included."""
    for name in ops.list_ops():
        op = ops.get_op(name)
        for backend, reason in op.availability("cpu").items():
            if reason is None and (backend == "reference" or not op.backends[backend].direct):
                yield pytest.param(name, backend, id=f"{name}-{backend}")


@pytest.mark.parametrize("op_name,backend", list(_torch_op_backends()))
def test_opcheck(op_name, backend):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of
    medgen::<op> with each kernel, inputs requiring grad where the op is differentiable
    (so its registered backward, and the backward kernels, run too)."""
    op = ops.get_op(op_name)
    args, kwargs = _small_inputs(op_name, requires_grad=op.differentiable)
    torch.library.opcheck(op.torch_op, (*op.op_args(*args, **kwargs), backend))


@pytest.mark.parametrize("op_name", ["adaln_modulate", "gated_residual"])
def test_opcheck_backward_ops(op_name):
    """The fused backward kernels are torch ops too (no autograd of their own)."""
    backward = getattr(torch.ops.medgen, f"{op_name}_backward").default
    x, a, b = _small_inputs(op_name, requires_grad=False)[0]
    for backend, reason in ops.get_op(op_name).availability("cpu").items():
        if reason is not None:
            continue
        if op_name == "adaln_modulate":  # (dy, x, scale, eps)
            torch.library.opcheck(backward, (torch.randn_like(x), x, b, 1e-6, backend))
        else:  # (dout, gate, y)
            torch.library.opcheck(backward, (torch.randn_like(x), a, b, backend))


@pytest.mark.skipif(not NATIVE, reason="medgen_rt._C is not built")
@pytest.mark.parametrize("op_name", ["adaln_modulate", "attention", "gated_residual", "patch_embed", "unpatchify"])
def test_torch_op_backward_matches_reference(op_name):
    """The one registered autograd: grads through medgen::<op> with the native kernel equal
    the reference's own autograd."""
    op = ops.get_op(op_name)
    args, kwargs = _small_inputs(op_name, requires_grad=True)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = op(*args, backend="native", **kwargs)
    assert "medgen" in type(out.grad_fn).__name__.lower() or out.grad_fn.name().startswith("medgen"), \
        f"{op_name}: a call needing grad must go through medgen::{op_name}, got {out.grad_fn.name()}"
    want = op(*args, backend="reference", **kwargs)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(want.shape, generator=gen)
    got_grads = torch.autograd.grad(out, leaves, dout)
    want_grads = torch.autograd.grad(want, leaves, dout)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---- backend choice: cached, overridable -------------------------------------------------

def _adaln_modulate_args():
    return torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 16)


def test_choice_is_cached_per_signature(monkeypatch):
    op = ops.get_op("adaln_modulate")
    calls = []
    select = op.select
    monkeypatch.setattr(op, "select", lambda *a, **k: calls.append(1) or select(*a, **k))
    op._cache.clear()
    x, shift, scale = _adaln_modulate_args()
    for _ in range(3):
        op(x, shift, scale)
    assert len(calls) == 1
    op(x[:, :3], shift, scale)  # another shape: resolved once more
    assert len(calls) == 2
    monkeypatch.setenv("MEDGEN_BACKEND", "reference")  # the environment is read every call
    op(x, shift, scale)
    assert len(calls) == 3
    for _ in range(2):  # the same name by argument: its own entry (an argument may raise where the env falls back)
        op(x, shift, scale, backend="reference")
    assert len(calls) == 4


def _chosen(op, args):
    """The backend the registry picks for these arguments under the current overrides."""
    return op.select(args, {})[0]


def test_use_backend_overrides_env_and_yields_to_argument(monkeypatch):
    op = ops.get_op("adaln_modulate")
    args = _adaln_modulate_args()
    monkeypatch.setenv("MEDGEN_BACKEND", "native" if NATIVE else "reference")
    with ops.use_backend("reference"):
        assert _chosen(op, args) == "reference"
        assert op.select(args, {}, backend=_cpu_backend(op))[0] == _cpu_backend(op)
        with ops.use_backend(None):  # lifts the outer override: the environment applies again
            assert _chosen(op, args) == _cpu_backend(op)
    assert _chosen(op, args) == _cpu_backend(op)


def test_use_backend_runs_the_reference(monkeypatch):
    op = ops.get_op("adaln_modulate")
    ran = []
    monkeypatch.setattr(op, "reference", lambda *a, **k: ran.append(1) or torch.zeros(2, 5, 16))
    op._cache.clear()
    with ops.use_backend("reference"):
        op(*_adaln_modulate_args())
    assert ran == [1]
    op._cache.clear()


def test_use_backend_missing_from_op_falls_back_to_auto():
    op = ops.get_op("linear_gated_residual")  # no native backend
    args = (torch.randn(1, 3, 8), torch.randn(1, 8), torch.randn(1, 3, 4), torch.randn(8, 4), None)
    with ops.use_backend("native"):
        assert op.select(args, {})[0] == "reference"
        op(*args)


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        with ops.use_backend("cudnn"):
            pass


# ---- the native kernels use torch's thread count ------------------------------------------

@pytest.mark.skipif(not NATIVE, reason="medgen_rt._C is not built")
def test_native_kernels_follow_torch_threads():
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ops.adaln_modulate(*_adaln_modulate_args(), backend="native")
            assert _native.native_module().build_info()["cpu_threads"] == n
    finally:
        torch.set_num_threads(before)


# ---- torch.compile of the models -------------------------------------------------------------

def _tiny_models():
    from medgen_rt.models.dit import DiT, dit_config
    from medgen_rt.models.tgca import TGCA

    torch.manual_seed(0)
    dit3d = DiT(dit_config("dit3d-tiny", input_size=(8, 8, 4)))
    dit4d = DiT(dit_config("dit4d-tiny", input_size=(2, 4, 4, 2)))
    tgca = TGCA(DiT(dit_config("dit3d-tiny", input_size=(8, 8, 4), qk_norm=True, rope=True)), mask_channels=2,
                inject_layers=1, encoder_channels=(4, 8))
    for model in (dit3d, dit4d, tgca):  # zero-initialised layers would hide most of the network
        for p in model.parameters():
            p.data.normal_(0, 0.05)
    t = torch.tensor([3.0, 250.0])
    return {
        "dit3d": (dit3d.eval(), (torch.randn(2, 8, 8, 8, 4), t)),
        "dit4d": (dit4d.eval(), (torch.randn(2, 8, 2, 4, 4, 2), t)),
        "tgca": (tgca.eval(), (torch.randn(2, 8, 8, 8, 4), t, torch.rand(2, 2, 16, 16, 8))),
    }


@pytest.fixture(scope="module")
def tiny_models():
    return _tiny_models()


@pytest.mark.parametrize("name", ["dit3d", "dit4d", "tgca"])
def test_no_graph_breaks(name, tiny_models):
    model, inputs = tiny_models[name]
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(*inputs)
    assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit3d", "dit4d", "tgca"])
def test_compile_fullgraph_matches_eager(name, tiny_models):
    """Inductor on the CPU with the default backends: native kernels as opaque torch ops,
    the rest generated; the output equals eager."""
    model, inputs = tiny_models[name]
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(*inputs)
        got = torch.compile(model, fullgraph=True)(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_graph_follows_use_backend():
    """The op's choice is made while tracing; use_backend is guarded, so entering it
    recompiles and the graph holds plain PyTorch instead of medgen::adaln_modulate."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x, s, c: ops.adaln_modulate(x, s, c), backend=backend, fullgraph=True)
    args = _adaln_modulate_args()
    fn(*args)
    with ops.use_backend("reference"):
        fn(*args)
    assert len(graphs) == 2
    assert any("medgen.adaln_modulate" in t for t in graphs[0]) == NATIVE
    assert not any("medgen" in t for t in graphs[1])
