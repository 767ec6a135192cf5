"""Triton kernels of medgen_rt, installed as ``medgen_rt.kernels``.

One kernel per file: launch functions for the forward (and the backward, where
the op has a fused one) taking prepared tensors; each op's autograd lives with
the op in ``medgen_rt.ops``. Importing this package never imports triton;
:func:`triton_unavailable_reason` says whether the kernels can run on a device type. On the CPU they run only in Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is first imported), which is slow and
meant for tests on small shapes.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux x86_64 / aarch64 only)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install should not break the CPU path
        return f"triton failed to import: {exc}"
    return None


# Constant for the life of the process; torch.compile calls it while tracing and keeps the answer.
@torch.compiler.assume_constant_result
def triton_unavailable_reason(device_type: str) -> Optional[str]:
    """None when Triton kernels can run on this device type, else why not."""
    reason = _triton_import_error()
    if reason is not None:
        return reason
    if device_type == "cpu":
        if not interpreter_enabled():
            return "Triton runs on the CPU only in its interpreter: set TRITON_INTERPRET=1 before starting Python"
        return None
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        if interpreter_enabled():
            return "TRITON_INTERPRET=1 is set, so Triton would not run on the GPU"
        return None
    return f"no Triton kernels for device type {device_type!r}"
