"""Op registry: every fused op is a name with one reference implementation and
up to three fast backends; the registry picks one per call and caches the choice.

Selection, first match wins:
  1. ``backend=`` argument of the call (``"reference"``, ``"triton"``, ``"native"``);
  2. :func:`use_backend` (a context manager, process-wide while its block runs);
  3. the ``MEDGEN_BACKEND`` environment variable, same names;
  4. automatic: the backends whose ``default_on`` holds the tensor's device type,
     by priority, the first that is available and supports the arguments;
     otherwise the reference.

An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` with the cause. An automatically chosen one that
cannot run is skipped quietly. A backend named by ``use_backend`` or
``MEDGEN_BACKEND`` that an op does not implement at all falls back to that op's
automatic choice (a backend may cover only some ops); the same name passed as
``backend=`` raises.

Caching. The choice is resolved once per *signature* and remembered: the request
above, grad mode, and for each argument its value, or for a tensor its dtype,
shape, device and requires_grad (and strides, for ops made with
``key_strides=True``). The first call with a signature checks the arguments and
picks the backend; later calls are one dict lookup. So a backend's ``supports``
check (and an op's ``check_args``) may look at nothing but the signature.
``MEDGEN_BACKEND`` is read on every call (it is part of the key): changing it
mid-process takes effect on the next call.

Execution. Each op with fast kernels is also a ``torch.library`` custom op,
``torch.ops.medgen.<name>(*op_args, backend)`` (see :meth:`Op.define_torch_op`): a
fake implementation for the compiler and export, the kernels registered per
device type, one registered autograd. The registry runs a chosen fast backend
  * in eager mode when no input needs a gradient (sampling): the kernel itself,
    skipping torch's dispatcher, whose Python custom-op path costs 15-35 us a call;
  * when an input needs a gradient, and always under ``torch.compile`` or
    ``torch.export``: through the torch op, so autograd and the compiler see one op.
The reference always runs inline as plain PyTorch: the compiler fuses it, and ONNX
export (which sets MEDGEN_BACKEND=reference) sees only standard operators. The Triton
kernels run inside the op's kernel, opaque to Inductor: torch.library.triton_op would
expose them, but its fake path launches them, which fails under Triton's CPU
interpreter (the only way to test them without a GPU).

Under ``torch.compile`` the choice is made while tracing: ``use_backend`` is
guarded (entering or leaving it recompiles); ``MEDGEN_BACKEND`` is read at
tracing time only; availability is treated as a constant of the process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

ENV_VAR = "MEDGEN_BACKEND"
REFERENCE = "reference"
# flash_attn: the optional flash-attn package (attention only), registered when it imports
KNOWN_BACKENDS = (REFERENCE, "triton", "native", "flash_attn")
NAMESPACE = "medgen"  # torch.ops.medgen.<op>
_CACHE_LIMIT = 1024  # signatures remembered per op; a sweep over many shapes starts over


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run this call."""


# (device_type) -> None when usable there, else a reason.
AvailabilityCheck = Callable[[str], Optional[str]]
# (*args, **kwargs) -> None when the backend handles these arguments, else a reason.
SupportCheck = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    fn: the kernel. For an op with a torch op (:meth:`Op.define_torch_op`) it takes the
    torch op's arguments (``op_args`` of the public ones, without ``backend``) and
    returns its outputs, outside autograd; otherwise, and for ``direct`` backends, it
    takes the public arguments.
    direct: fn carries its own autograd and traces under torch.compile (a third-party
    kernel such as flash-attn): it is called with the public arguments in every mode.
    """
    name: str
    fn: Callable[..., Any]
    devices: frozenset  # device types it can run on at all
    default_on: frozenset  # device types where auto-selection may pick it
    priority: int = 0  # higher is tried first in auto-selection
    is_available: AvailabilityCheck = lambda device_type: None
    supports: Optional[SupportCheck] = None
    direct: bool = False

    def why_not(self, device_type: str, args: tuple, kwargs: dict) -> Optional[str]:
        """None when this backend can run the call, else the reason it cannot."""
        if device_type not in self.devices:
            return f"it does not run on {device_type} (runs on: {', '.join(sorted(self.devices))})"
        reason = self.is_available(device_type)
        if reason is None and self.supports is not None:
            reason = self.supports(*args, **kwargs)
        return reason


# The use_backend() override. A module global rather than a ContextVar: torch.compile
# cannot trace ContextVar.get, and it guards globals, so a compiled graph follows it.
_override: Optional[str] = None


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Within the block, every op call runs backend ``name`` unless it passes ``backend=``;
    ``None`` lifts an outer override. Takes precedence over ``MEDGEN_BACKEND`` and, like it,
    leaves ops that lack the backend on their automatic choice. Process-wide, not per thread.

        with ops.use_backend("reference"):
            y = model(x)
    """
    global _override
    if name is not None:
        name = _normalize(name, "use_backend", "use_backend() argument")
    previous = _override
    _override = name
    try:
        yield
    finally:
        _override = previous


def _normalize(requested: str, op_name: str, source: str) -> str:
    name = requested.strip().lower()
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"{op_name}: unknown backend {requested!r} from the {source}; "
                         f"choose one of {', '.join(KNOWN_BACKENDS)}")
    return name


@dataclass
class Op:
    """One fused op: ``op(*args, backend=None, **kwargs)`` dispatches to a backend."""

    name: str
    reference: Callable[..., Any]
    check_args: Optional[Callable[..., None]] = None  # raises on bad input, for every backend
    backends: dict = field(default_factory=dict)
    differentiable: bool = True  # False: outputs never carry a gradient (no autograd needed)
    key_strides: bool = False  # True when a backend's supports() looks at strides
    torch_op: Any = None  # torch.ops.medgen.<name>.default, set by define_torch_op
    op_def: Any = None  # its torch.library CustomOpDef, for further registrations
    op_args: Optional[Callable[..., tuple]] = None  # public arguments -> the torch op's (without backend)
    _by_priority: list = field(default_factory=list, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def register(self, backend: Backend) -> Backend:
        if backend.name == REFERENCE or backend.name not in KNOWN_BACKENDS:
            raise ValueError(f"{self.name}: backend name must be one of {KNOWN_BACKENDS[1:]}, got {backend.name!r}")
        self.backends[backend.name] = backend
        self._by_priority = sorted(self.backends.values(), key=lambda b: -b.priority)
        self._cache.clear()
        return backend

    def backend_names(self) -> list:
        return [REFERENCE] + sorted(self.backends)

    # ---- calls ------------------------------------------------------------------------

    def __call__(self, *args, backend: Optional[str] = None, **kwargs):
        if torch.compiler.is_compiling():
            return self._traced_call(args, kwargs, backend)
        # By argument or process-wide: the same name can raise as one and fall back as the other.
        requested = (backend, True) if backend is not None else (_override or _env_backend(), False)
        key = (requested, torch.is_grad_enabled(), _signature(args, self.key_strides),
               _signature(kwargs.items(), self.key_strides) if kwargs else None)
        try:
            run = self._cache.get(key)
        except TypeError:  # an unhashable argument: resolve every call
            key, run = None, None
        if run is None:
            if self.check_args is not None:
                self.check_args(*args, **kwargs)
            run = self.select(args, kwargs, backend)[1]
            if key is not None:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[key] = run
        return run(*args, **kwargs)

    def _traced_call(self, args: tuple, kwargs: dict, backend: Optional[str]):
        """Under torch.compile/export: the same choice, traced (no cache); fast backends
        always through the torch op, so the graph holds one node per op."""
        if self.check_args is not None:
            self.check_args(*args, **kwargs)
        name = self._choose(args, kwargs, backend)
        if name == REFERENCE:
            return self.reference(*args, **kwargs)
        chosen = self.backends[name]
        if chosen.direct or self.torch_op is None:
            return chosen.fn(*args, **kwargs)
        return self.torch_op(*self.op_args(*args, **kwargs), name)

    def select(self, args: tuple, kwargs: dict, backend: Optional[str] = None) -> tuple:
        """(name, callable) of the backend that will run these arguments; the callable
        takes the public arguments (no checks, no choice: what a cached call runs)."""
        name = self._choose(args, kwargs, backend)
        return name, self._runner(name, self._needs_grad(args, kwargs))

    def torch_op_call(self, backend: str, *args, **kwargs):
        """``torch.ops.medgen.<name>`` on the public arguments with a named backend
        (for tests and benchmarks; callers use ``op(...)``)."""
        return self.torch_op(*self.op_args(*args, **kwargs), backend)

    def _choose(self, args: tuple, kwargs: dict, backend: Optional[str]) -> str:
        device_type = _device_type(args, kwargs)
        requested, source = backend, "backend= argument"
        if requested is None:
            requested, source = _override, "use_backend() context"
        if requested is None:
            requested, source = os.environ.get(ENV_VAR) or None, f"{ENV_VAR} environment variable"
        if requested is not None:
            requested = _normalize(requested, self.name, source)
            if requested == REFERENCE:
                return REFERENCE
            chosen = self.backends.get(requested)
            if chosen is None:
                if backend is not None:
                    raise BackendUnavailableError(
                        f"{self.name}: no '{requested}' backend; this op has {', '.join(self.backend_names())}")
                # use_backend/env naming a backend this op lacks: the automatic choice.
            else:
                reason = chosen.why_not(device_type, args, kwargs)
                if reason is not None:
                    raise BackendUnavailableError(
                        f"{self.name}: backend '{requested}' was requested by the {source} "
                        f"but cannot run on {device_type}: {reason}")
                return requested
        for candidate in self._by_priority:
            if device_type in candidate.default_on and candidate.why_not(device_type, args, kwargs) is None:
                return candidate.name
        return REFERENCE

    def _needs_grad(self, args: tuple, kwargs: dict) -> bool:
        return (self.differentiable and torch.is_grad_enabled()
                and any(t.requires_grad for t in _tensors((args, tuple(kwargs.values())))))

    def _runner(self, name: str, needs_grad: bool) -> Callable[..., Any]:
        """What a call with this backend runs, taking the public arguments."""
        if name == REFERENCE:
            return self.reference
        chosen = self.backends[name]
        if chosen.direct or self.torch_op is None:
            return chosen.fn
        op_args = self.op_args
        if needs_grad:  # through the dispatcher: the op's registered autograd records the call
            torch_op = self.torch_op
            return lambda *args, **kwargs: torch_op(*op_args(*args, **kwargs), name)
        kernel = chosen.fn
        return lambda *args, **kwargs: kernel(*op_args(*args, **kwargs))

    def availability(self, device_type: str) -> dict:
        """Backend name -> None if it can run on this device type, else the reason."""
        out = {REFERENCE: None}
        for name, b in sorted(self.backends.items()):
            reason = None if device_type in b.devices else f"does not run on {device_type}"
            out[name] = reason or b.is_available(device_type)
        return out

    # ---- the torch.library op -----------------------------------------------------------

    def define_torch_op(self, schema: str, op_args: Callable[..., tuple], fake: Callable[..., Any], *,
                        mutates_args: tuple = (), setup_context: Optional[Callable] = None,
                        backward: Optional[Callable] = None,
                        reference_kernel: Optional[Callable[..., Any]] = None) -> None:
        """Defines ``torch.ops.medgen.<name>`` and routes the op's fast backends through it.

        schema: the op's arguments, ending in ``str backend`` (the name of the kernel to run,
            chosen by the registry), e.g. ``"(Tensor x, Tensor gate, Tensor y, str backend) -> Tensor"``.
        op_args: public arguments -> the schema's arguments without ``backend``: flattened
            (no tuples of tensors) and prepared for the kernels (casts, layouts) in PyTorch,
            so autograd maps the gradients back through those steps.
        fake: the schema's arguments -> outputs of the right shape, dtype and strides.
        setup_context, backward: the op's one autograd (torch.library.register_autograd);
            ``backend`` is an input, so a backward may pick the matching backward kernel.
        reference_kernel: the reference on the schema's arguments (default: ``reference``),
            run when the torch op is called with backend ``"reference"``.

        The kernels are registered per device type (``register_kernel``), each accepting
        the backends that run there; the op's default implementation, for any other
        device, runs only the reference.
        """
        reference_kernel = reference_kernel or self.reference
        name = f"{NAMESPACE}::{self.name}"

        def default_impl(*args):
            if args[-1] != REFERENCE:
                raise BackendUnavailableError(f"{name}: backend {args[-1]!r} has no kernel for this device")
            return reference_kernel(*args[:-1])

        op_def = torch.library.custom_op(name, default_impl, mutates_args=mutates_args, schema=schema)
        for device_type in sorted({d for b in self.backends.values() if not b.direct for d in b.devices}):
            op_def.register_kernel(device_type, self._device_kernel(device_type, reference_kernel))
        op_def.register_fake(fake)
        if backward is not None:
            op_def.register_autograd(backward, setup_context=setup_context)
        self.op_def = op_def
        self.torch_op = op_def._opoverload  # calling the OpOverload skips one Python layer
        self.op_args = op_args
        self._cache.clear()

    def _device_kernel(self, device_type: str, reference_kernel: Callable[..., Any]) -> Callable[..., Any]:
        def kernel(*args):
            backend = args[-1]
            if backend == REFERENCE:
                return reference_kernel(*args[:-1])
            chosen = self.backends.get(backend)
            if chosen is None or chosen.direct or device_type not in chosen.devices:
                raise BackendUnavailableError(f"{NAMESPACE}::{self.name}: no '{backend}' kernel on {device_type}")
            return chosen.fn(*args[:-1])
        return kernel


_OPS: dict = {}


def register_op(name: str, reference: Callable[..., Any], check_args=None, **options) -> Op:
    if name in _OPS:
        raise ValueError(f"op {name!r} is already registered")
    op = Op(name=name, reference=reference, check_args=check_args, **options)
    _OPS[name] = op
    return op


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; registered: {', '.join(sorted(_OPS))}") from None


def list_ops() -> list:
    return sorted(_OPS)


def clear_caches() -> None:
    """Forget every op's cached choices. Availability (an extension that imports, a GPU)
    is taken as a constant of the process; whoever changes it mid-process (a test
    simulating a missing extension) calls this."""
    for op in _OPS.values():
        op._cache.clear()


def _device_type(args: tuple, kwargs: dict) -> str:
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.device.type
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


# os.environ.get costs ~1 us a call (key encoding, Mapping machinery), a fifth of the
# budget of a cached call; os.environ keeps the process environment in this dict, which
# setting os.environ[...] (monkeypatch.setenv too) updates.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON_DATA is not None else None


def _env_backend() -> Optional[str]:
    """MEDGEN_BACKEND, read live (eager calls; traced calls use os.environ.get)."""
    if _ENVIRON_DATA is None:
        return os.environ.get(ENV_VAR) or None
    raw = _ENVIRON_DATA.get(_ENV_KEY)
    return os.environ.decodevalue(raw) if raw else None


def _signature(values, strides: bool) -> tuple:
    """The cache key of some arguments: tensors by metadata, the rest by value."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((v.dtype, v.shape, v.device, v.requires_grad, v.stride()) if strides
                       else (v.dtype, v.shape, v.device, v.requires_grad))
        elif isinstance(v, (tuple, list)):
            out.append(_signature(v, strides))
        elif isinstance(v, slice):
            out.append((v.start, v.stop, v.step))
        else:
            out.append(v)
    return tuple(out)


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)
