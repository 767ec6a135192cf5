"""The one prepared command for a lent GPU: build, GPU tests, a full-size sample, the kernel suite; one JSON.

    python bench/gpu_check.py                          # -> bench/results/gpu-check-<device>-<date>.json
    python bench/gpu_check.py --out $OUT/gpu-check.json   # on the device tool, where $OUT comes back

Steps, in order of what matters most, each in a child process killed at its time box:
  1. build    pip install --no-build-isolation --no-deps . for this GPU's arch only (the
              four-arch build's ptxas report is bench/results/ptxas-cuda-kernels.json), with ptxas -v;
              the log's per-kernel registers/spills are parsed into the JSON
  2. tests    pytest -m gpu (the tests that need a CUDA device)
  3. sample   DiT-B/2 + ct-ds8 at 512x512x256, 50 DDIM steps, planned for --max-vram 8GB
              (bench/e2e.py's medgen_rt path); fails if either phase's peak passes 8 GB
  4. suite    bench/run_all.py's kernel benches for cuda, one script at a time, while time is left
All share --budget seconds (default 450: the whole run stays under 8 minutes with start-up);
a step gets min(its cap, what is left) and a later step is skipped once nothing is left.
The JSON is rewritten after every step, so a run cut short still leaves what it did.
Exit code 0 when every step passed, 1 otherwise.

Without a visible CUDA GPU it prints "skipped: no GPU ..." and exits with code 2 within seconds,
writing no JSON (a gpu-check file in bench/results always means a GPU ran it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
NO_GPU_EXIT = 2
CAPS = {"build": 180, "tests": 120, "sample": 150, "suite_script": 120}  # seconds; the suite takes what is left
SAMPLE_VRAM_GB = 8.0


def run_step(cmd, timeout: float, env=None) -> dict:
    """Runs cmd in its own process group (pytest and pip spawn children), kills the group at timeout."""
    t0 = time.monotonic()
    if timeout <= 5:
        return {"status": "skipped", "reason": "no time left in the budget", "seconds": 0}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "pass" if proc.returncode == 0 else "fail"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    return {"status": status, "returncode": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
            "cmd": " ".join(map(str, cmd)), "output": out or ""}


def tail(step: dict, chars: int = 3000) -> dict:
    step["output_tail"] = step.pop("output", "")[-chars:]
    return step


def environment(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    env = {"device": props.name, "sm": f"{props.major}{props.minor}", "memory_gb": round(props.total_memory / 2**30, 1),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for name, cmd in (("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                      ("nvcc", ["/usr/local/cuda/bin/nvcc", "--version"])):
        try:
            env[name] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[-1]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            env[name] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    # Runtime dependencies that a bare image may lack (they travel as wheels; see the device README).
    import importlib.util

    env["missing_modules"] = [m for m in ("nibabel", "safetensors", "monai", "einops", "codecarbon", "onnx",
                                          "onnxruntime", "onnxscript", "yaml", "PIL", "tqdm", "pytest")
                              if importlib.util.find_spec(m) is None]
    return env


def build(arch: str, timeout: float) -> dict:
    from ptxas_report import parse

    step = run_step([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", ".",
                     f"-Ccmake.define.CMAKE_CUDA_ARCHITECTURES={arch}", "-Ccmake.define.MEDGEN_PTXAS_VERBOSE=ON"],
                    timeout)
    kernels = parse(step.get("output", ""))
    step["ptxas"] = {"kernels": len(kernels), "max_registers": max((k["registers"] or 0 for k in kernels), default=0),
                     "spilling": sorted({k["mangled"] for k in kernels if k["spill_stores"] or k["spill_loads"]})}
    if step["status"] == "pass":  # the installed module must carry the CUDA kernels and see the GPU
        probe = run_step([sys.executable, "-c", "import json, medgen_rt._C as C; "
                          "print(json.dumps({'build': C.build_info()['cuda'], 'archs': C.build_info()['cuda_archs'],"
                          " 'devices': C.cuda_devices()['devices']}))"], 60)
        step["native"] = probe["output"].strip().splitlines()[-1] if probe["output"].strip() else None
        if probe["status"] != "pass" or '"build": true' not in (step["native"] or ""):
            step["status"] = "fail"
    return tail(step)


def gpu_tests(timeout: float, tmp: Path) -> dict:
    junit = tmp / "junit.xml"
    step = run_step([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                     f"--junitxml={junit}", "tests"], timeout)
    if junit.is_file():
        head = junit.read_text()[:2000]
        step["counts"] = {k: int(v) for k, v in re.findall(r'\b(tests|failures|errors|skipped)="(\d+)"', head)[:4]}
    return tail(step)


def sample(timeout: float) -> dict:
    step = run_step([sys.executable, "bench/e2e.py", "--child", "medgen_rt", "--config", "ct", "--device", "cuda",
                     "--no-energy"], timeout)
    try:
        step["result"] = json.loads(step["output"].strip().splitlines()[-1])
        peaks = step["result"]["peak_gb"]
        if step["status"] == "pass" and max(peaks.values()) > SAMPLE_VRAM_GB:
            step["status"] = "fail"
            step["reason"] = f"peak {peaks} GB over the {SAMPLE_VRAM_GB} GB budget"
    except (ValueError, IndexError, KeyError, TypeError):
        pass
    return tail(step)


def suite(deadline: float, tmp: Path) -> dict:
    from run_all import SUITE

    scripts, t0 = {}, time.monotonic()
    for script in SUITE:
        out = tmp / f"{script}.json"
        step = run_step([sys.executable, "bench/run_all.py", "--device", "cuda", "--only", script, "--out", str(out)],
                        min(CAPS["suite_script"], deadline - time.monotonic()))  # no script starves the rest
        if out.is_file():
            result = json.loads(out.read_text())["results"].get(script, {})
            step["result"] = result
            if "error" in result:
                step["status"] = "fail"
        scripts[script] = tail(step, 1500)
    statuses = {s["status"] for s in scripts.values()}
    status = "pass" if statuses == {"pass"} else "fail" if "fail" in statuses or "timeout" in statuses else "partial"
    return {"status": status, "seconds": round(time.monotonic() - t0, 1), "scripts": scripts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON path (default bench/results/gpu-check-<device>-<date>.json)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all steps together")
    p.add_argument("--steps", nargs="+", default=["build", "tests", "sample", "suite"])
    args = p.parse_args(argv)
    start = time.monotonic()
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        torch, gpu = None, False
    if not gpu:
        print("gpu_check: skipped: no GPU (torch.cuda.is_available() is False); nothing was built or run, "
              "no JSON written", file=sys.stderr)
        return NO_GPU_EXIT
    env = environment(torch)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    date = datetime.date.today().isoformat()
    out = Path(args.out or ROOT / f"bench/results/gpu-check-{slug}-{date}.json")
    report = {"benchmark": "gpu_check", "date": date, "environment": env, "budget_s": args.budget, "steps": {}}

    def save():
        report["total_s"] = round(time.monotonic() - start, 1)
        report["passed"] = all(s["status"] == "pass" for s in report["steps"].values())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    deadline = start + args.budget
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.steps:
            left = deadline - time.monotonic()
            print(f"gpu_check: {name} ({left:.0f} s left)", flush=True)
            if name == "build":
                step = build(env["sm"], min(CAPS["build"], left))
            elif name == "tests":
                step = gpu_tests(min(CAPS["tests"], left), Path(tmp))
            elif name == "sample":
                step = sample(min(CAPS["sample"], left))
            else:
                step = suite(deadline, Path(tmp))
            report["steps"][name] = step
            print(f"gpu_check: {name}: {step['status']} in {step.get('seconds', 0)} s", flush=True)
            save()
    print(f"gpu_check: wrote {out} ({'all passed' if report['passed'] else 'NOT all passed'})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
