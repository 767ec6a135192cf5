"""Per-call cost of the op registry on tiny tensors, where the kernels themselves
take a few microseconds and any dispatch overhead shows.

For every op, on the CPU, float32, under ``torch.no_grad()`` (sampling) and with
inputs that require grad (training), it times:

    registry   ops.<op>(...)                   the public call: checks, backend choice, kernel
    kernel     the same backend called directly (Op.select's callable: no checks, no choice)
    torch_op   torch.ops.medgen.<op> with the chosen backend (the dispatcher path that
               torch.compile and training take), where the op has one

and reports ``registry - kernel`` as the registry's own cost per call. Calls are
interleaved and each figure is the best of several rounds of many calls (the
machine may be busy). Run quietly:

    OMP_NUM_THREADS=1 python bench/dispatch.py                 # writes bench/results/dispatch-cpu.json
    python bench/dispatch.py --rounds 5 --calls 2000 --out /tmp/d.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, versions, write_json  # noqa: E402

from medgen_rt import ops  # noqa: E402


def tiny_inputs(name: str, gen: torch.Generator) -> tuple:
    """(args, kwargs) of one small call per op, the sizes of a test, not of a model."""
    def r(*shape):
        return torch.randn(*shape, generator=gen)

    if name == "adaln_modulate":
        return (r(2, 8, 16), r(2, 16), r(2, 16)), {}
    if name == "gated_residual":
        return (r(2, 8, 16), r(2, 16), r(2, 8, 16)), {}
    if name == "linear_gated_residual":
        return (r(2, 8, 16), r(2, 16), r(2, 8, 32), r(16, 32), r(16)), {}
    if name == "attention":
        return (r(1, 2, 8, 16), r(1, 2, 8, 16), r(1, 2, 8, 16)), {}
    if name == "patch_embed":
        return (r(1, 2, 4, 4, 4), r(16, 16), r(16), (2, 2, 2), r(8, 16)), {}
    if name == "unpatchify":
        return (r(1, 8, 16), (2, 2, 2), (2, 2, 2), 2), {}
    if name == "vq_nearest":
        return (r(8, 4), r(16, 4)), {}
    if name == "tile_blend":
        region = (slice(2, 6), slice(0, 4), slice(4, 8))
        return (r(1, 1, 8, 8, 8), torch.zeros(8, 8, 8), r(1, 1, 4, 4, 4), region), {}
    if name == "tile_normalize":
        return (r(1, 1, 8, 8, 8), torch.rand(8, 8, 8) + 0.5), {}
    raise KeyError(name)


def best_per_call(fns: dict, rounds: int, calls: int) -> dict:
    """Microseconds per call, best round of `calls` calls, rounds interleaved across fns."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():  # warm-up: first calls resolve and cache the backend choice
        for _ in range(20):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best


def torch_op_call(op, backend: str, args: tuple, kwargs: dict):
    """torch.ops.medgen.<op> with `backend`, or None where the op has no torch.library op."""
    to_op = getattr(op, "torch_op_call", None)
    if to_op is None or backend == "reference":
        return None
    return lambda: to_op(backend, *args, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--ops", nargs="+", default=None, help="default: every registered op")
    p.add_argument("--out", default="bench/results/dispatch-cpu.json")
    args = p.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    names = args.ops or ops.list_ops()
    rows = []
    load_before = os.getloadavg()[0]
    print(f"{'op':>22} {'mode':>8} {'backend':>10} {'registry':>9} {'kernel':>8} {'overhead':>9} {'torch_op':>9}  (us/call)")
    for name in names:
        op = ops.get_op(name)
        base_args, kwargs = tiny_inputs(name, gen)
        for mode in ("no_grad", "grad"):
            differentiable = name not in ("vq_nearest", "tile_blend", "tile_normalize")
            if mode == "grad" and not differentiable:
                continue
            call_args = tuple(a.detach().clone().requires_grad_(mode == "grad" and a.is_floating_point())
                              if isinstance(a, torch.Tensor) else a for a in base_args)
            with torch.set_grad_enabled(mode == "grad"):
                backend, kernel = op.select(call_args, kwargs)
                fns = {"registry": lambda: op(*call_args, **kwargs), "kernel": lambda: kernel(*call_args, **kwargs)}
                via_op = torch_op_call(op, backend, call_args, kwargs)
                if via_op is not None:
                    fns["torch_op"] = via_op
                t = best_per_call(fns, args.rounds, args.calls)
            row = {"op": name, "mode": mode, "backend": backend, **{k: round(v, 2) for k, v in t.items()},
                   "overhead_us": round(t["registry"] - t["kernel"], 2)}
            rows.append(row)
            print(f"{name:>22} {mode:>8} {backend:>10} {t['registry']:9.2f} {t['kernel']:8.2f} "
                  f"{row['overhead_us']:9.2f} {t.get('torch_op', float('nan')):9.2f}")
    write_json(args.out, {"benchmark": "dispatch", "device": device_description("cpu"), "versions": versions(),
                          "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
                          "rounds": args.rounds, "calls": args.calls, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
