"""Backend selection rules of the op registry, on a toy op and on adaln_modulate."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from medgen_rt import ops
from medgen_rt.ops import _native, registry
from medgen_rt.ops.registry import Backend, BackendUnavailableError, Op


def _toy_op():
    """An op whose backends tag their results, so the chosen one is visible."""
    op = Op(name="toy", reference=lambda x: ("reference", x))
    op.register(Backend(name="native", fn=lambda x: ("native", x), devices=frozenset({"cpu"}),
                        default_on=frozenset({"cpu"}), priority=1))
    op.register(Backend(name="triton", fn=lambda x: ("triton", x), devices=frozenset({"cpu", "cuda"}),
                        default_on=frozenset({"cuda"}), priority=2,
                        is_available=lambda dev: "interpreter is off" if dev == "cpu" else None))
    return op


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("MEDGEN_BACKEND", raising=False)


def test_auto_picks_default_backend_for_device():
    assert _toy_op()(torch.zeros(1))[0] == "native"


def test_auto_skips_unusable_backend_quietly():
    op = _toy_op()
    op.register(Backend(name="native", fn=lambda x: ("native", x), devices=frozenset({"cpu"}),
                        default_on=frozenset({"cpu"}), is_available=lambda dev: "not built"))
    assert op(torch.zeros(1))[0] == "reference"


def test_argument_overrides_auto_and_env(monkeypatch):
    monkeypatch.setenv("MEDGEN_BACKEND", "native")
    assert _toy_op()(torch.zeros(1), backend="reference")[0] == "reference"


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("MEDGEN_BACKEND", "reference")
    assert _toy_op()(torch.zeros(1))[0] == "reference"


def test_forced_unavailable_backend_raises_with_cause():
    with pytest.raises(BackendUnavailableError, match=r"toy: backend 'triton'.*backend= argument.*interpreter is off"):
        _toy_op()(torch.zeros(1), backend="triton")


def test_env_forced_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("MEDGEN_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="MEDGEN_BACKEND environment variable"):
        _toy_op()(torch.zeros(1))


def test_backend_on_wrong_device_raises():
    with pytest.raises(BackendUnavailableError, match="does not run on meta"):
        _toy_op()(torch.zeros(1, device="meta"), backend="native")


def test_env_backend_missing_from_op_falls_back_to_auto(monkeypatch):
    op = Op(name="partial", reference=lambda x: ("reference", x))
    op.register(Backend(name="native", fn=lambda x: ("native", x), devices=frozenset({"cpu"}),
                        default_on=frozenset({"cpu"})))
    monkeypatch.setenv("MEDGEN_BACKEND", "triton")
    assert op(torch.zeros(1))[0] == "native"
    with pytest.raises(BackendUnavailableError, match="no 'triton' backend"):
        op(torch.zeros(1), backend="triton")


def test_unknown_backend_name_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        _toy_op()(torch.zeros(1), backend="cudnn")
    monkeypatch.setenv("MEDGEN_BACKEND", "fast")
    with pytest.raises(ValueError, match="MEDGEN_BACKEND"):
        _toy_op()(torch.zeros(1))


def test_registering_unknown_backend_name_fails():
    with pytest.raises(ValueError):
        _toy_op().register(Backend(name="magic", fn=print, devices=frozenset(), default_on=frozenset()))


def test_unknown_op_name():
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        ops.get_op("nope")


# ---- the real op ---------------------------------------------------------------

def _adaln_modulate_args():
    return torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 16)


def test_adaln_modulate_auto_uses_native_on_cpu():
    assert ops.get_op("adaln_modulate").select(_adaln_modulate_args(), {})[0] == "native"


def test_adaln_modulate_native_unloadable_falls_back_or_raises(monkeypatch, request):
    monkeypatch.setattr(_native, "_load", lambda: (None, "medgen_rt._C could not be imported (simulated)"))
    registry.clear_caches()  # cached choices assume the extension loaded; forget them (and again after)
    request.addfinalizer(registry.clear_caches)
    op = ops.get_op("adaln_modulate")
    assert op.select(_adaln_modulate_args(), {})[0] == "reference"
    with pytest.raises(BackendUnavailableError, match="simulated"):
        op(*_adaln_modulate_args(), backend="native")


def test_adaln_modulate_rejects_bad_arguments():
    x, shift, scale = _adaln_modulate_args()
    with pytest.raises(ValueError, match="x must be a \\(B, N, C\\)"):
        ops.adaln_modulate(x[0], shift, scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.adaln_modulate(x, shift, scale[:, :8])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.adaln_modulate(x.double(), shift, scale)


def test_native_extension_validates_descriptions():
    """The C++ side checks shapes itself; a mismatch is a ValueError naming the argument."""
    C_ = _native.native_module()
    x, shift, scale = _adaln_modulate_args()
    y = torch.empty_like(x)
    d = _native.describe
    with pytest.raises(ValueError, match="shift: shape"):
        C_.adaln_modulate_forward(d(x), d(shift[:1]), d(scale), d(y), None, None, 1e-6, 0)
    with pytest.raises(ValueError, match="scale: dtype"):
        C_.adaln_modulate_forward(d(x), d(shift), d(scale.half()), d(y), None, None, 1e-6, 0)


def test_triton_forced_without_interpreter_or_gpu_raises():
    """In a fresh process without TRITON_INTERPRET and without a GPU, forcing Triton fails clearly."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Triton is available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MEDGEN_BACKEND"] = "triton"
    code = ("import torch\nfrom medgen_rt import ops\n"
            "ops.adaln_modulate(torch.randn(1, 2, 8), torch.randn(1, 8), torch.randn(1, 8))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "BackendUnavailableError" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr
