"""Running the real CLI from the tests, and checking that bad input ends as one clear line with
exit 2 and no traceback.

``medgen(ARGS)`` is ``python -m medgen_rt ARGS`` in a child process, returned as a
subprocess.CompletedProcess. A fresh interpreter spends ~3 s importing torch before any work,
and the tests make some hundred CLI calls; so on one torch thread the child is forked from the
test process instead, where torch and medgen_rt are already imported, and runs ``cli.main`` as
``__main__`` would: fresh stdout/stderr on pipes, the given cwd and environment, logging and
warnings as a new interpreter has them, exit status from main, a traceback and status 1 on an
uncaught exception. GNU OpenMP cannot start threads in a forked child of a process that used
them (it hangs), so more than one thread takes a real subprocess. Tests that send signals or
need a pristine interpreter (no torch imported, another sys.path) start their own.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def medgen(*args, cwd=None, env=None, timeout=600, threads: int = 1) -> subprocess.CompletedProcess:
    """``python -m medgen_rt ARGS`` on ``threads`` torch threads (the tests share 2 cores)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    argv = [sys.executable, "-m", "medgen_rt", *map(str, args)]
    if threads != 1:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env)
    return _forked(argv, cwd, full_env, timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """Exit ``code``, no traceback, and every needle (a file, an argument) named in stderr."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    assert proc.returncode == code, (proc.returncode, text[-3000:])
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def _forked(argv: list, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(out_r)
        os.close(err_r)
        _child(argv[3:], cwd, env, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    chunks = {out_r: [], err_r: []}
    readers = [threading.Thread(target=_drain, args=(fd, chunks[fd]), daemon=True) for fd in (out_r, err_r)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            for t in readers:
                t.join()
            raise subprocess.TimeoutExpired(argv, timeout, b"".join(chunks[out_r]), b"".join(chunks[err_r]))
        time.sleep(0.01)
    for t in readers:
        t.join()
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status),
                                       b"".join(chunks[out_r]).decode(), b"".join(chunks[err_r]).decode())


def _drain(fd: int, into: list) -> None:
    with os.fdopen(fd, "rb") as f:
        while block := f.read1(1 << 16):
            into.append(block)


def _child(args: list, cwd, env: dict, out_w: int, err_w: int) -> None:
    code = 1
    try:
        import io
        import logging
        import warnings

        null = os.open(os.devnull, os.O_RDONLY)
        for src, dst in ((null, 0), (out_w, 1), (err_w, 2)):
            os.dup2(src, dst)
            os.close(src)
        sys.stdin = open(0, closefd=False)
        # as a new interpreter's: stdout strict, stderr backslashreplace, both UTF-8 here
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8", line_buffering=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      line_buffering=True)
        sys.argv = [sys.executable, *args]
        os.environ.clear()
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        # pytest's capture handlers and warning recorder would swallow what the CLI logs and warns
        logging.root.handlers.clear()
        logging.root.setLevel(logging.WARNING)
        warnings.resetwarnings()
        for action, category in (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                                 ("ignore", ImportWarning), ("ignore", ResourceWarning)):
            warnings.simplefilter(action, category)
        warnings.showwarning = warnings._showwarning_orig
        warnings._showwarnmsg_impl = lambda msg: sys.stderr.write(warnings._formatwarnmsg(msg))

        import torch

        torch.set_num_threads(1)
        from medgen_rt.cli import main

        try:
            code = main(args)
        except SystemExit as exc:  # argparse, or an explicit exit
            code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)
