"""Generic harness: every registered backend of every op against the reference,
forward and backward, over the shape, layout and dtype table in op_cases.py.
Backends that cannot run here (no GPU, no interpreter) are skipped with the reason."""
from __future__ import annotations

import itertools

import pytest
import torch

from medgen_rt import ops
from op_cases import OP_CASES, TOLERANCE

# backends wrapping third-party packages; ours must handle every case in the table
OPTIONAL_BACKENDS = {"flash_attn"}


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cases():
    for op_name in ops.list_ops():
        case = OP_CASES.get(op_name)
        if case is None:
            continue  # test_every_op_has_cases fails instead
        op = ops.get_op(op_name)
        for backend, device, dtype in itertools.product(sorted(op.backends), _devices(), case.dtypes):
            interpreted = backend == "triton" and device == "cpu"
            shapes = case.small_shapes if interpreted else case.shapes
            for shape, layout in itertools.product(shapes, case.layouts):
                marks = [pytest.mark.gpu] if device == "cuda" else []
                yield pytest.param(op_name, backend, device, dtype, shape, layout, marks=marks,
                                   id=f"{op_name}-{backend}-{device}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{layout}")


def test_every_op_has_cases():
    missing = [name for name in ops.list_ops() if name not in OP_CASES]
    assert not missing, f"ops without an entry in tests/op_cases.py: {missing}"


def _assert_close(actual, expected, tol, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != reference {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    # Relative to each element and to the tensor's scale (reductions such as the
    # shift/scale gradients lose relative precision on their smallest entries).
    scale = e.abs().max().item()
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("op_name,backend,device,dtype,shape,layout", list(_cases()))
def test_backend_matches_reference(op_name, backend, device, dtype, shape, layout):
    op = ops.get_op(op_name)
    reason = op.availability(device)[backend]
    if reason is not None:
        pytest.skip(f"{backend} on {device}: {reason}")
    case = OP_CASES[op_name]
    gen = torch.Generator().manual_seed(hash((op_name, shape, layout)) % 2**31)
    args, kwargs = case.make_inputs(shape, dtype, device, layout, gen)
    tol = TOLERANCE[dtype]

    wants_grad = case.differentiable
    ref_args = [a.detach().clone().requires_grad_(wants_grad) if _is_float_tensor(a) else a for a in args]
    fast_args = [a.detach().clone().requires_grad_(wants_grad) if _is_float_tensor(a) else a for a in args]
    # Keep the original layout (strides) of each input: clone() preserves strides of views only
    # for dense tensors, so rebuild through as_strided when needed.
    for src, dst_list in ((args, ref_args), (args, fast_args)):
        for i, a in enumerate(src):
            if _is_float_tensor(a) and a.stride() != dst_list[i].stride():
                buf = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
                buf.copy_(a)
                dst_list[i] = buf.requires_grad_(wants_grad)

    if backend in OPTIONAL_BACKENDS:  # a third-party kernel covers only part of the op (e.g. 16-bit)
        refusal = op.backends[backend].why_not(device, tuple(args), kwargs)
        if refusal is not None:
            pytest.skip(f"{backend}: {refusal}")
    expected = _outputs(op(*ref_args, backend="reference", **kwargs), ref_args)
    actual = _outputs(op(*fast_args, backend=backend, **kwargs), fast_args)
    assert len(actual) == len(expected), f"{op_name}[{backend}]: {len(actual)} outputs, reference has {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e.is_floating_point():
            _assert_close(a, e, tol, f"{op_name}[{backend}] output {i}")
        else:  # indices and other integer outputs must match exactly
            assert a.dtype == e.dtype and torch.equal(a.cpu(), e.cpu()), f"{op_name}[{backend}] output {i} differs"
    if not case.differentiable:
        return

    float_out = [(a, e) for a, e in zip(actual, expected) if e.is_floating_point()]
    grads_out = [torch.randn(e.shape, generator=gen).to(device=device, dtype=e.dtype) for _, e in float_out]
    inputs = [i for i, a in enumerate(args) if _is_float_tensor(a)]
    ref_grads = torch.autograd.grad([e for _, e in float_out], [ref_args[i] for i in inputs], grads_out)
    fast_grads = torch.autograd.grad([a for a, _ in float_out], [fast_args[i] for i in inputs], grads_out)
    for i, g_fast, g_ref in zip(inputs, fast_grads, ref_grads):
        _assert_close(g_fast, g_ref, tol, f"{op_name}[{backend}] grad of input {i}")


def _is_float_tensor(a) -> bool:
    """Differentiable inputs; other arguments (patch sizes, tables in tuples) pass through."""
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _outputs(result, args):
    """An op's outputs; for in-place ops (returning None) the tensors they were given, after the call."""
    if result is None:
        return tuple(a for a in args if isinstance(a, torch.Tensor))
    return _as_tuple(result)


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("op_name", sorted(OP_CASES))
def test_env_reference_routes_every_op_to_reference(op_name, monkeypatch):
    """MEDGEN_BACKEND=reference routes every call to the reference implementation."""
    op = ops.get_op(op_name)
    monkeypatch.setenv("MEDGEN_BACKEND", "reference")
    case = OP_CASES[op_name]
    args, kwargs = case.make_inputs(case.shapes[1], torch.float32, "cpu", "contiguous", torch.Generator().manual_seed(0))
    name, fn = op.select(args, kwargs)
    assert name == "reference" and fn is op.reference
