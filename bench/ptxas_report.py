"""Registers, spills, stack and shared memory of every CUDA kernel in csrc/cuda, per architecture.

    python bench/ptxas_report.py                      # -> bench/results/ptxas-cuda-kernels.json
    python bench/ptxas_report.py --arch 90 --out /tmp/sm90.json

Compiles each csrc/cuda/*.cu with the flags CMakeLists.txt gives the extension
(-O3 -lineinfo, C++17) plus `-Xptxas -v`, for the architectures the build targets,
and parses ptxas's per-kernel report. No GPU needed, only nvcc
(/usr/local/cuda/bin/nvcc or on PATH). Exit code 1 when a kernel spills, so a
regression shows (a stack frame without spills, a local array, is only reported);
the JSON is written either way.
The build itself prints the same lines with `-C cmake.define.MEDGEN_PTXAS_VERBOSE=ON`.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = [80, 86, 89, 90]  # CMAKE_CUDA_ARCHITECTURES in CMakeLists.txt
FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-DMEDGEN_WITH_CUDA=1", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v"]

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
BARRIERS = re.compile(r"used (\d+) barriers")
SMEM = re.compile(r"(\d+) bytes smem")


def nvcc() -> str | None:
    path = Path("/usr/local/cuda/bin/nvcc")
    return str(path) if path.exists() else shutil.which("nvcc")


def parse(log: str) -> list:
    """One dict per (entry function, arch) from ptxas -v output."""
    out, cur = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            cur = {"mangled": m.group(1), "arch": int(m.group(2)), "registers": None, "barriers": 0,
                   "shared_bytes": 0, "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0}
            out.append(cur)
        elif cur and (m := SPILL.search(line)):
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        elif cur and (m := USED.search(line)):
            cur["registers"] = int(m.group(1))
            cur["barriers"] = int(b.group(1)) if (b := BARRIERS.search(line)) else 0
            cur["shared_bytes"] = int(sm.group(1)) if (sm := SMEM.search(line)) else 0
            cur = None  # "Used" closes an entry; later "Function properties" lines are device functions
    return out


def short_name(demangled: str) -> str:
    """'void medgen::cuda::(anonymous namespace)::k<float, 4>(medgen::cuda::Args)' -> 'k<float, 4>'."""
    name = demangled.removeprefix("void ")
    name = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name)  # the argument list
    return name.replace("medgen::cuda::", "").replace("(anonymous namespace)::", "")


def compile_one(cu: Path, archs, compiler: str) -> list:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    proc = subprocess.run([compiler, "-c", str(cu), "-o", "/dev/null", *FLAGS, *gencode],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {cu.name}:\n{proc.stderr[-3000:]}")
    records = parse(proc.stdout + proc.stderr)
    filt = shutil.which("cu++filt", path=str(Path(compiler).parent)) or shutil.which("c++filt")
    names = [r["mangled"] for r in records]
    if filt and names:
        names = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    for r, name in zip(records, names):
        r["kernel"] = short_name(name)
        r["file"] = f"csrc/cuda/{cu.name}"
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=ARCHS)
    p.add_argument("--out", default=str(ROOT / "bench/results/ptxas-cuda-kernels.json"))
    args = p.parse_args(argv)
    compiler = nvcc()
    if compiler is None:
        print("skipped: nvcc not found (/usr/local/cuda/bin/nvcc or PATH)")
        return 77
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    sources = sorted((ROOT / "csrc/cuda").glob("*.cu"))
    with ThreadPoolExecutor(2) as pool:  # nvcc is single-threaded per file
        records = [r for rs in pool.map(lambda cu: compile_one(cu, args.arch, compiler), sources) for r in rs]
    records.sort(key=lambda r: (r["file"], r["kernel"], r["arch"]))
    # A stack frame without spills is a local array by design (vq_nearest_kernel's generic-D row): reported, not failed.
    bad = [r for r in records if r["spill_stores"] or r["spill_loads"] or r["registers"] > 255]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"nvcc": version, "flags": FLAGS[:4] + ["-Icsrc", "-Xptxas", "-v"],
                                          "archs": args.arch, "kernels": records}, indent=1) + "\n")
    print(f"{'kernel':64} {'sm':>3} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}")
    for r in records:
        print(f"{r['kernel'][:64]:64} {r['arch']:>3} {r['registers']:>4} {r['shared_bytes']:>6} {r['stack_bytes']:>5} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<5}")
    print(f"{len(records)} kernels x arch from {len(sources)} files, {version}; wrote {args.out}")
    for r in bad:
        print(f"SPILL: {r['kernel']} sm_{r['arch']}: {r['stack_bytes']} B stack, "
              f"{r['spill_stores']}/{r['spill_loads']} B spill stores/loads, {r['registers']} registers")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
