"""Op registry: every fused op is a name with one reference implementation and
up to three fast backends, picked per call from the device, dtype and shape.

Selection, first match wins:
  1. ``backend=`` argument of the call (``"reference"``, ``"triton"``, ``"native"``);
  2. the ``MEDGEN_BACKEND`` environment variable, same names;
  3. automatic: the backends whose ``default_on`` holds the tensor's device type,
     by priority, the first that is available and supports the arguments;
     otherwise the reference.

An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` with the cause. An automatically chosen one that
cannot run is skipped quietly. A backend named in ``MEDGEN_BACKEND`` that an op
does not implement at all falls back to that op's automatic choice (a backend may
cover only some ops); the same name passed as ``backend=`` raises.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

ENV_VAR = "MEDGEN_BACKEND"
REFERENCE = "reference"
# flash_attn: the optional flash-attn package (attention only), registered when it imports
KNOWN_BACKENDS = (REFERENCE, "triton", "native", "flash_attn")


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run this call."""


# (device_type) -> None when usable there, else a reason.
AvailabilityCheck = Callable[[str], Optional[str]]
# (*args, **kwargs) -> None when the backend handles these arguments, else a reason.
SupportCheck = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., Any]
    devices: frozenset  # device types it can run on at all
    default_on: frozenset  # device types where auto-selection may pick it
    priority: int = 0  # higher is tried first in auto-selection
    is_available: AvailabilityCheck = lambda device_type: None
    supports: Optional[SupportCheck] = None

    def why_not(self, device_type: str, args: tuple, kwargs: dict) -> Optional[str]:
        """None when this backend can run the call, else the reason it cannot."""
        if device_type not in self.devices:
            return f"it does not run on {device_type} (runs on: {', '.join(sorted(self.devices))})"
        reason = self.is_available(device_type)
        if reason is None and self.supports is not None:
            reason = self.supports(*args, **kwargs)
        return reason


@dataclass
class Op:
    """One fused op: ``op(*args, backend=None, **kwargs)`` dispatches to a backend."""

    name: str
    reference: Callable[..., Any]
    check_args: Optional[Callable[..., None]] = None  # raises on bad input, for every backend
    backends: dict = field(default_factory=dict)

    def register(self, backend: Backend) -> Backend:
        if backend.name == REFERENCE or backend.name not in KNOWN_BACKENDS:
            raise ValueError(f"{self.name}: backend name must be one of {KNOWN_BACKENDS[1:]}, got {backend.name!r}")
        self.backends[backend.name] = backend
        return backend

    def backend_names(self) -> list:
        return [REFERENCE] + sorted(self.backends)

    def select(self, args: tuple, kwargs: dict, backend: Optional[str] = None) -> tuple:
        """Returns (name, callable) of the backend that will run these arguments."""
        device_type = _device_type(args, kwargs)
        source = "backend= argument"
        requested = backend
        if requested is None:
            requested = os.environ.get(ENV_VAR) or None
            source = f"{ENV_VAR} environment variable"
        if requested is not None:
            requested = requested.strip().lower()
            if requested not in KNOWN_BACKENDS:
                raise ValueError(f"{self.name}: unknown backend {requested!r} from the {source}; "
                                 f"choose one of {', '.join(KNOWN_BACKENDS)}")
            if requested == REFERENCE:
                return REFERENCE, self.reference
            chosen = self.backends.get(requested)
            if chosen is None:
                if backend is not None:
                    raise BackendUnavailableError(
                        f"{self.name}: no '{requested}' backend; this op has {', '.join(self.backend_names())}")
                # Global env override naming a backend this op lacks: use the automatic choice.
            else:
                reason = chosen.why_not(device_type, args, kwargs)
                if reason is not None:
                    raise BackendUnavailableError(
                        f"{self.name}: backend '{requested}' was requested by the {source} "
                        f"but cannot run on {device_type}: {reason}")
                return chosen.name, chosen.fn
        for candidate in sorted(self.backends.values(), key=lambda b: -b.priority):
            if device_type in candidate.default_on and candidate.why_not(device_type, args, kwargs) is None:
                return candidate.name, candidate.fn
        return REFERENCE, self.reference

    def __call__(self, *args, backend: Optional[str] = None, **kwargs):
        if self.check_args is not None:
            self.check_args(*args, **kwargs)
        _, fn = self.select(args, kwargs, backend)
        return fn(*args, **kwargs)

    def availability(self, device_type: str) -> dict:
        """Backend name -> None if it can run on this device type, else the reason."""
        out = {REFERENCE: None}
        for name, b in sorted(self.backends.items()):
            reason = None if device_type in b.devices else f"does not run on {device_type}"
            out[name] = reason or b.is_available(device_type)
        return out


_OPS: dict = {}


def register_op(name: str, reference: Callable[..., Any], check_args=None) -> Op:
    if name in _OPS:
        raise ValueError(f"op {name!r} is already registered")
    op = Op(name=name, reference=reference, check_args=check_args)
    _OPS[name] = op
    return op


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; registered: {', '.join(sorted(_OPS))}") from None


def list_ops() -> list:
    return sorted(_OPS)


def _device_type(args: tuple, kwargs: dict) -> str:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"
