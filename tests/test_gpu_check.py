"""GPU readiness without a GPU: bench/gpu_check.py refuses quickly and clearly where no GPU is
visible, and bench/ptxas_report.py's parser and committed report keep up with csrc/cuda."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from ptxas_report import parse, short_name  # noqa: E402


def test_gpu_check_without_a_gpu_exits_2_before_any_work(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a machine that has one
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "skipped: no GPU" in proc.stderr
    assert not out.exists()  # a gpu-check JSON always means a GPU ran it


LOG = """\
ptxas info    : Compiling entry function '_ZN6medgen4cuda6kernelIfEEvNS_4ArgsE' for 'sm_90'
ptxas info    : Function properties for _ZN6medgen4cuda6kernelIfEEvNS_4ArgsE
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 8768 bytes smem
ptxas info    : Compiling entry function '_Z5plainv' for 'sm_80'
ptxas info    : Function properties for _Z5plainv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


def test_ptxas_log_parsing():
    a, b = parse(LOG)
    assert (a["arch"], a["registers"], a["barriers"], a["shared_bytes"]) == (90, 64, 1, 8768)
    assert (a["stack_bytes"], a["spill_stores"], a["spill_loads"]) == (8, 4, 4)
    assert (b["arch"], b["registers"], b["shared_bytes"], b["stack_bytes"]) == (80, 30, 0, 0)  # helper not mixed in
    assert short_name("void medgen::cuda::(anonymous namespace)::k<float, 4>(medgen::cuda::Args)") == "k<float, 4>"


def test_committed_ptxas_report_covers_every_cuda_kernel():
    """A __global__ kernel added to csrc/cuda needs `python bench/ptxas_report.py` rerun."""
    report = json.loads((ROOT / "bench/results/ptxas-cuda-kernels.json").read_text())
    reported = {(k["file"], k["kernel"].split("<")[0]) for k in report["kernels"]}
    for cu in (ROOT / "csrc/cuda").glob("*.cu"):
        for name in re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", cu.read_text()):
            assert (f"csrc/cuda/{cu.name}", name) in reported, f"{cu.name}: {name} missing from the ptxas report"
    assert {80, 90} <= {k["arch"] for k in report["kernels"]}
