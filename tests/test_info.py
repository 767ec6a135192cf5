"""`medgen info` and the native build: what was compiled and which devices are seen."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import medgen_rt
from medgen_rt.ops import _native
from cli_run import medgen


def _nvcc_present() -> bool:
    return bool(shutil.which("nvcc")) or os.path.exists("/usr/local/cuda/bin/nvcc")


def test_native_extension_loads_and_reports_its_parts():
    info = _native.native_module().build_info()
    assert info["cpu"] is True
    assert info["cpu_threads"] >= 1
    assert "adaln_modulate" in info["ops"]
    if _nvcc_present():
        # CMake builds the CUDA part whenever nvcc exists; this module loaded without a GPU.
        assert info["cuda"] is True
        assert info["cuda_archs"] == "80,86,89,90"


def test_native_cuda_device_query_is_safe_without_gpu():
    devices = _native.native_module().cuda_devices()
    if not torch.cuda.is_available():
        assert devices["devices"] == []
        assert devices["error"]  # says why (no driver / built without CUDA)
    else:
        assert len(devices["devices"]) == torch.cuda.device_count()


def _run_cli(*args):
    return medgen(*args, timeout=120)


def test_medgen_info_json_lists_compiled_parts_and_devices():
    proc = _run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["medgen_rt"] == medgen_rt.__version__
    assert info["native"]["cpu"] is True
    if _nvcc_present():
        assert info["native"]["cuda"] is True
    assert info["cuda"]["available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert info["cuda"]["devices"] == [] and info["native"]["cuda_devices"]["devices"] == []
    assert info["backends"]["adaln_modulate"]["cpu"]["native"] is None
    assert info["packages"]["torch"] == torch.__version__


def test_medgen_info_text_is_readable():
    proc = _run_cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "cpu kernels      compiled" in proc.stdout
    if _nvcc_present():
        assert "cuda kernels     compiled (sm 80,86,89,90" in proc.stdout
    if not torch.cuda.is_available():
        assert "gpus seen        none" in proc.stdout


def test_python_info_matches_cli():
    info = medgen_rt.info()
    assert info["native"]["cpu"] is True and "adaln_modulate" in info["backends"]


def test_medgen_without_command_prints_help_and_fails():
    proc = _run_cli()
    assert proc.returncode == 2 and "phantom" in proc.stdout


@pytest.mark.parametrize("argv", [["nonsense"], ["phantom", "mri"]])
def test_medgen_bad_arguments_exit_nonzero(argv):
    proc = _run_cli(*argv)
    assert proc.returncode == 2 and "error" in proc.stderr and "Traceback" not in proc.stderr


def test_closed_stdout_ends_quietly_without_traceback():
    # `medgen info | head -1`: the reader is gone before we write. The read end is closed
    # before the child starts, so every write fails (no race with a real `head`).
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        code = "import sys; from medgen_rt.cli import main; sys.exit(main(['info']))"
        proc = subprocess.run([sys.executable, "-c", code], stdout=write_fd, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(write_fd)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
