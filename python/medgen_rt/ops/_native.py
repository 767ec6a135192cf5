"""Bridge from torch tensors to the native extension ``medgen_rt._C``.

The extension does not link against PyTorch; each tensor crosses as a
``TensorDesc`` (data pointer, shape, strides, dtype, device) and CUDA work is
queued on torch's current stream, which we pass as a raw handle. The CPU kernels
use torch's thread count (``torch.get_num_threads()``), handed over before each
call when it has changed, and run single-threaded below a work-size threshold.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
NATIVE_DTYPES = frozenset(_DTYPE_NAMES)
# Index outputs (vq_nearest's indices) only; kernels take values in NATIVE_DTYPES.
_INDEX_DTYPE_NAMES = {torch.int64: "int64"}
_threads_set = 0  # the thread count last handed to the extension


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) when the extension imports, else (None, reason)."""
    try:
        from medgen_rt import _C  # noqa: PLC0415 - optional compiled part
    except ImportError as exc:  # not built, or built for another Python
        return None, f"medgen_rt._C could not be imported ({exc}); reinstall with `pip install .`"
    return _C, None


def native_module():
    """The extension, with its CPU thread count following torch's."""
    global _threads_set
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    threads = torch.get_num_threads()
    if threads != _threads_set:
        module.set_num_threads(threads)
        _threads_set = threads
    return module


def num_threads() -> int:
    """Threads the CPU kernels use: torch's."""
    return torch.get_num_threads()


# Constant for the life of the process; torch.compile calls it while tracing and
# keeps the answer instead of tracing into the extension.
@torch.compiler.assume_constant_result
def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the native backend can run on this device type, else why not."""
    module, reason = _load()
    if module is None:
        return reason
    info = module.build_info()
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not info.get("cuda"):
            return "medgen_rt._C was built without CUDA (nvcc was not found at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None
    return f"no native kernels for device type {device_type!r}"


def describe(t: torch.Tensor):
    """TensorDesc for a tensor: pointer, shape, strides in elements, dtype, device."""
    dtype = _DTYPE_NAMES.get(t.dtype) or _INDEX_DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise TypeError(f"native kernels take float32, float16 or bfloat16 tensors (int64 for indices), got {t.dtype}")
    device = -1  # the CPU (is_cuda: a flag read, cheaper than device.type on small calls)
    if t.is_cuda:
        device = t.device.index
        if device is None:  # "cuda" without an index
            device = torch.cuda.current_device()
    module = _load()[0] or native_module()  # native_module raises with the reason
    return module.TensorDesc(t.data_ptr(), list(t.shape), list(t.stride()), dtype, device)


def stream_handle(t: torch.Tensor) -> int:
    """Raw cudaStream_t of torch's current stream on t's device (0 on the CPU)."""
    if not t.is_cuda:
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
