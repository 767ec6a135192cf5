"""GPU readiness without a GPU: every Triton kernel in kernels/ compiles ahead of time for sm_80
and sm_90 at the shapes the models launch it with, within shared memory and registers
(bench/triton_aot.py does the work; see its docstring).

The compile runs in a child process: conftest.py switches this process to Triton's
interpreter, under which triton.jit gives functions that cannot be compiled. Compiles land
in Triton's cache (~/.triton/cache or TRITON_CACHE_DIR): cold, the default cases take about
30 s of CPU on this machine, warm about 5 s. DiT-S/L, B/4 and DiT4D-B are `slow`; float32 of every
preset is left to `python bench/triton_aot.py --all` (~4 min of CPU), whose output is committed as
bench/results/triton-aot-kernels.json.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "triton_aot.py"


def _compile(tmp_path, *args):
    out = tmp_path / "aot.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args], capture_output=True, text=True,
                          env=env, timeout=1200)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    print(proc.stdout)  # the table of registers / local / shared per kernel (pytest -s or -rA shows it)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["kernels"] and not report["problems"]
    for line in report["warnings"]:  # candidates the autotuner will skip: shown, not failed
        print("warning:", line)
    return report


def test_kernels_compile_for_sm80_sm90_at_dit_b2_and_tiny_shapes(tmp_path):
    report = _compile(tmp_path)
    assert {r["arch"] for r in report["kernels"]} == {80, 90}
    cases = {c for r in report["kernels"] for c in r["cases"]}
    assert any(c.startswith("dit3d-b/2-bfloat16/attention") for c in cases)


@pytest.mark.slow
def test_kernels_compile_for_the_other_published_presets(tmp_path):
    _compile(tmp_path, "--presets", "dit3d-s/2", "dit3d-l/2", "dit3d-b/4", "dit4d-b")


def _harness():
    spec = importlib.util.spec_from_file_location("triton_aot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overflow_rules():
    """The checks themselves, on made-up records: they fail what a GPU would refuse or run slowly."""
    aot = _harness()
    ok = dict(kernel="m.k_kernel", arch=90, cases=["c"], autotune_candidate=False, num_warps=4, num_stages=3,
              shared_bytes=1024, registers=128, local_bytes=0)
    assert aot.problems([ok, {**ok, "arch": 80}], [80, 90], {"m.k_kernel"}) == ([], [])
    bad = [
        {**ok, "shared_bytes": 232448 + 1},  # over sm_90's 227 KB per block
        {**ok, "arch": 80, "shared_bytes": 166912 + 1},  # over sm_80's 163 KB
        {**ok, "arch": 80, "shared_bytes": 101376 + 1},  # fits sm_80, not the sm_86/89 cards
        {**ok, "registers": 255, "num_warps": 16},  # 255 x 512 threads > 64K registers
        {**ok, "local_bytes": 16},  # spills in a launch with no alternative
        {"kernel": "m.k_kernel", "arch": 90, "cases": ["c"], "error": "CompilationError"},
    ]
    for rec in bad:
        assert len(aot.problems([rec], [rec["arch"]], set())[0]) == 1, rec
    # A kernel nobody launched is a problem.
    assert len(aot.problems([ok], [90], {"m.k_kernel", "m.other_kernel"})[0]) == 1
    # Autotuner candidates that cannot launch only warn while another one fits the target.
    small, big = {**ok, "arch": 80, "autotune_candidate": True}, {**ok, "arch": 80, "autotune_candidate": True,
                                                                   "shared_bytes": 180000}
    bad, warn = aot.problems([small, big], [80], set(), [{"case": "c", "candidates": [small, big]}])
    assert bad == [] and len(warn) == 1
    mid = {**big, "shared_bytes": 120000}  # fits sm_80, not sm_86/89: no candidate left there
    bad, _ = aot.problems([mid, big], [80], set(), [{"case": "c", "candidates": [mid, big]}])
    assert len(bad) == 1 and "sm_86" in bad[0]
