"""What this installation is: versions, compiled native parts, the backend each
op would use per device, and the CUDA devices torch and the extension see."""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("torch", "triton", "numpy", "nibabel", "safetensors", "monai", "onnx", "onnxruntime",
             "onnxruntime-gpu", "codecarbon", "flash-attn")


def _version(dist: str):
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def collect_info() -> dict:
    import medgen_rt
    from medgen_rt import ops
    from medgen_rt.ops import _native

    import torch

    module, native_error = _native._load()
    native = dict(module.build_info()) if module is not None else {"error": native_error}
    if module is not None:
        native["cuda_devices"] = dict(module.cuda_devices())
    native.pop("ops", None)

    torch_cuda = {
        "available": torch.cuda.is_available(),
        "torch_cuda_version": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    backends = {}
    for name in ops.list_ops():
        op = ops.get_op(name)
        backends[name] = {dev: op.availability(dev) for dev in ("cpu", "cuda")}
    return {
        "medgen_rt": medgen_rt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "native": native,
        "cuda": torch_cuda,
        "backends": backends,
    }


def no_gpu_reason(error) -> str:
    """Why no GPU is seen, in plain words. Without an NVIDIA driver the CUDA runtime reports
    "CUDA driver version is insufficient", which reads as if a driver needed an update."""
    text = str(error or "")
    driver = os.path.exists("/proc/driver/nvidia/version")
    if not driver and ("insufficient" in text or "no CUDA-capable device" in text or not text):
        return "no GPU (no NVIDIA driver found)"
    if "no CUDA-capable device" in text:
        return "no GPU (the NVIDIA driver sees no device)"
    return f"no GPU ({text})" if text else "no GPU"


def format_info(info: dict) -> str:
    """Readable multi-line summary of :func:`collect_info`."""
    lines = [f"medgen_rt {info['medgen_rt']}  (python {info['python']}, {info['platform']})", "", "packages:"]
    for name, ver in info["packages"].items():
        lines.append(f"  {name:<16} {ver or '-'}")
    native = info["native"]
    lines += ["", "native extension medgen_rt._C:"]
    if "error" in native and "cpu" not in native:
        lines.append(f"  not available: {native['error']}")
    else:
        lines.append(f"  cpu kernels      compiled (openmp: {'yes' if native.get('openmp') else 'no'}, "
                     f"{native.get('cpu_threads')} threads, {native.get('compiler', '?')})")
        if native.get("cuda"):
            rt = native.get("cuda_runtime_version", 0)
            lines.append(f"  cuda kernels     compiled (sm {native.get('cuda_archs')}, "
                         f"CUDA runtime {rt // 1000}.{rt % 1000 // 10})")
        else:
            lines.append("  cuda kernels     not compiled (nvcc was not found at build time)")
        devs = native.get("cuda_devices", {})
        if devs.get("devices"):
            lines.append(f"  gpus seen        {', '.join(devs['devices'])}")
        else:
            lines.append(f"  gpus seen        none: {no_gpu_reason(devs.get('error'))}")
    cuda = info["cuda"]
    lines += ["", "torch CUDA:",
              f"  available        {'yes' if cuda['available'] else 'no'}"
              f" (torch built with CUDA {cuda['torch_cuda_version'] or '-'})"]
    for d in cuda["devices"]:
        lines.append(f"  device           {d}")
    lines += ["", "backends (per op and device; 'ok' = can run):"]
    for op, per_device in info["backends"].items():
        for dev, avail in per_device.items():
            parts = [f"{b}: {'ok' if r is None else 'no'}" for b, r in avail.items()]
            lines.append(f"  {op:<16} {dev:<5} " + ", ".join(parts))
    return "\n".join(lines)
