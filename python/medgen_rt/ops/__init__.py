"""Fused ops behind one registry. Callers use these names and never pick kernels:

    from medgen_rt import ops
    y = ops.adaln_modulate(x, shift, scale)                 # automatic backend
    y = ops.adaln_modulate(x, shift, scale, backend="reference")

    with ops.use_backend("reference"):                     # for a block of code
        y = model(x)

``MEDGEN_BACKEND=reference|triton|native`` overrides the choice process-wide.
Each op is also a torch.library custom op, ``torch.ops.medgen.<name>``, which is
what torch.compile, torch.export and autograd see. See
:mod:`medgen_rt.ops.registry` for the selection rules and how calls run.
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
    use_backend,
)
# Importing each op module registers its op.
from medgen_rt.ops.adaln_modulate import adaln_modulate  # noqa: E402
from medgen_rt.ops.attention import attention  # noqa: E402
from medgen_rt.ops.gated_residual import gated_residual  # noqa: E402
from medgen_rt.ops.linear_gated_residual import linear_gated_residual  # noqa: E402
from medgen_rt.ops.patch_embed import patch_embed, unpatchify  # noqa: E402
from medgen_rt.ops.tile_blend import tile_blend, tile_normalize  # noqa: E402
from medgen_rt.ops.vq_nearest import vq_nearest  # noqa: E402

__all__ = [
    "ENV_VAR", "KNOWN_BACKENDS", "Backend", "BackendUnavailableError", "Op",
    "get_op", "list_ops", "register_op", "use_backend", "adaln_modulate", "attention", "gated_residual",
    "patch_embed", "unpatchify", "vq_nearest", "tile_blend", "tile_normalize", "linear_gated_residual",
]
