"""Shared helpers of the fault-injection tests (tests/test_faults_*.py): run the real CLI in a
subprocess and check that bad input ends as one clear line with exit 2 and no traceback."""
from __future__ import annotations

import os
import subprocess
import sys


def medgen(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m medgen_rt ARGS`` on one torch thread (the tests share 2 cores)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "medgen_rt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """Exit ``code``, no traceback, and every needle (a file, an argument) named in stderr."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    assert proc.returncode == code, (proc.returncode, text[-3000:])
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
