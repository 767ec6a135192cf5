"""Every benchmark of the kernels issue in one command, one JSON:

    python bench/run_all.py                       # CPU suite (this machine: ~12 min)
    python bench/run_all.py --device cuda --out bench/results/all-h100-2026-11-25.json

Runs each op's script (bench/adaln_modulate.py, gated_residual.py, vq_nearest.py,
attention.py, tile_blend.py, patch_embed.py) and bench/dit.py in a child
process with the device's shapes and collects their JSON under one device
description; a script that fails is recorded with its error and the others
still run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, versions, write_json  # noqa: E402

HERE = Path(__file__).parent
# script -> extra arguments per device type
SUITE = {
    "adaln_modulate.py": {"cpu": [], "cuda": ["--dtype", "float32", "bfloat16"]},
    "gated_residual.py": {"cpu": [], "cuda": ["--dtype", "float32", "bfloat16"]},
    "vq_nearest.py": {"cpu": [], "cuda": []},
    "attention.py": {"cpu": [], "cuda": []},
    "tile_blend.py": {"cpu": ["--repeats", "10"], "cuda": []},
    "patch_embed.py": {"cpu": ["--repeats", "10"], "cuda": ["--dtype", "float32", "bfloat16", "--compile"]},
    "dit.py": {"cpu": ["--presets", "dit3d-s/2", "--repeats", "3"],
               "cuda": ["--presets", "dit3d-s/2", "dit3d-b/2", "dit3d-l/2", "--dtype", "bfloat16", "--compile"]},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", nargs="+", help="run only these scripts")
    p.add_argument("--out", default="bench/results/all.json")
    args = p.parse_args(argv)
    kind = args.device.split(":")[0]
    collected = {}
    with tempfile.TemporaryDirectory() as tmp:
        for script, extra in SUITE.items():
            if args.only and script not in args.only:
                continue
            path = HERE / script
            if not path.is_file():
                collected[script] = {"error": "script not present"}
                continue
            out = Path(tmp) / (script + ".json")
            cmd = [sys.executable, str(path), "--device", args.device, "--out", str(out), *extra[kind]]
            print("$", " ".join(cmd[1:]), flush=True)
            proc = subprocess.run(cmd, text=True, capture_output=True)
            print(proc.stdout[-4000:], flush=True)
            if proc.returncode != 0 or not out.is_file():
                collected[script] = {"error": proc.stderr[-2000:]}
                continue
            collected[script] = json.loads(out.read_text())
    write_json(args.out, {"benchmark": "medgen_rt kernels suite", "device": device_description(args.device),
                          "versions": versions(), "results": collected})
    return 0


if __name__ == "__main__":
    sys.exit(main())
