"""medgen_rt: train, sample, export and evaluate latent diffusion models of
medical volumes (3D CT, 4D cine cardiac MRI) with fused Triton / C++ / CUDA kernels.

Submodules load lazily so that ``import medgen_rt`` stays cheap and the
torch-free parts (``medgen_rt.io``, ``medgen_rt.data``) work without PyTorch.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version as _dist_version

try:
    __version__ = _dist_version("medgen_rt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


def info() -> dict:
    """Versions, compiled native parts, backends per op and the devices seen."""
    from medgen_rt.info import collect_info

    return collect_info()


def sample(model: str = "default", n: int = 1, seed: int = 0, **kwargs) -> list:
    """Generate volumes; see :func:`medgen_rt.sampling.api.sample` for every argument."""
    from medgen_rt.sampling.api import sample as _sample

    return _sample(model, n=n, seed=seed, **kwargs)


def __getattr__(name: str):
    if name in {"ops", "io", "data", "kernels", "export", "cli", "models", "diffusion", "train", "runtime",
                "sampling"}:
        return import_module(f"medgen_rt.{name}")
    raise AttributeError(f"module 'medgen_rt' has no attribute {name!r}")


__all__ = ["__version__", "info", "sample"]
