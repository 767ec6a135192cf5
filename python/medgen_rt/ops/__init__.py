"""Fused ops behind one registry. Callers use these names and never pick kernels:

    from medgen_rt import ops
    y = ops.adaln_modulate(x, shift, scale)                 # automatic backend
    y = ops.adaln_modulate(x, shift, scale, backend="reference")

``MEDGEN_BACKEND=reference|triton|native`` overrides the choice process-wide.
See :mod:`medgen_rt.ops.registry` for the selection rules.
"""
from medgen_rt.ops.registry import (
    ENV_VAR,
    KNOWN_BACKENDS,
    Backend,
    BackendUnavailableError,
    Op,
    get_op,
    list_ops,
    register_op,
)
from medgen_rt.ops.adaln import adaln_modulate  # noqa: E402  (registers the op)

__all__ = [
    "ENV_VAR", "KNOWN_BACKENDS", "Backend", "BackendUnavailableError", "Op",
    "get_op", "list_ops", "register_op", "adaln_modulate",
]
