"""Benchmark the attention op: the Triton and native flash-style kernels against each of
PyTorch's SDPA backends (flash, efficient, cuDNN, math, forced with
torch.nn.attention.sdpa_kernel) and flash-attn when it is installed, forward
pass, plain and with RoPE + qk-norm.

    python bench/attention.py                                   # CUDA if present, bfloat16
    python bench/attention.py --device cuda --dtype bfloat16 float16 --out bench/results/attention-h100.json
    python bench/attention.py --device cpu --out bench/results/attention-cpu.json

Rows per (shape, dtype, features):
  sdpa-auto      the op's reference: qk-norm and RoPE in PyTorch, then SDPA as PyTorch picks it
  sdpa-<name>    the same with SDPA forced to one backend (skipped where that backend cannot run)
  triton         the op's Triton backend: norm and RoPE fused into the kernel (CUDA only)
  native         the op's native backend (csrc/cpu/attention.cpp, csrc/cuda/attention.cu): norm
                 and RoPE fused, float32 arithmetic (CPU and CUDA)
  flash_attn     flash-attn's kernel, norm and RoPE applied in PyTorch first (if installed, 16-bit CUDA)

On the CPU Triton runs only in its interpreter, which measures numpy and not the
kernel, so there only the reference, the SDPA backends and native are timed.

TFLOP/s counts the two matmuls, 4 * B * H * N^2 * d per forward (the usual
convention; the softmax and the norm/RoPE work are not counted).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, median_times, versions, write_json  # noqa: E402

from medgen_rt import ops  # noqa: E402

attention_mod = importlib.import_module("medgen_rt.ops.attention")  # the module; ops.attention is the op

# (B, H, N, d): the issue's N = 16384 (a 512x512x256 CT at ct-ds8, patch 2) with DiT-B heads
# (12 x 64) and DiT-L heads (16 x 72), the cine DiT4D-B tokens (6144), and d = 128.
CUDA_SHAPES = [(1, 12, 16384, 64), (1, 16, 16384, 72), (2, 12, 6144, 64), (1, 8, 16384, 128)]
# The CPU is ~1000x slower: the same N with one head, and DiT-B/L heads on DiT-B/4's 2048 tokens.
CPU_SHAPES = [(1, 1, 16384, 64), (1, 12, 2048, 64), (1, 16, 2048, 72)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
FEATURES = ("plain", "rope+qk_norm")


def flops(shape) -> float:
    B, H, N, d = shape
    return 4.0 * B * H * N * N * d


def make_inputs(shape, dtype, device, features, gen):
    B, H, N, d = shape
    q, k, v = (torch.randn(B, H, N, d, generator=gen).to(device, dtype) for _ in range(3))
    kwargs = {}
    if features == "rope+qk_norm":
        angles = torch.rand(N, d // 2, generator=gen) * 6.0
        kwargs["rope"] = (torch.cat([angles.cos()] * 2, -1).to(device), torch.cat([angles.sin()] * 2, -1).to(device))
        w = (1 + 0.1 * torch.randn(d, generator=gen)).to(device, dtype)
        kwargs["q_norm"] = kwargs["k_norm"] = (w, 0.1 * w, 1e-6)
    return (q, k, v), kwargs


def candidates(device, dtype, args, kwargs, skipped):
    """name -> no-grad callable; records why others are left out in `skipped`."""
    op = ops.get_op("attention")
    fns = {"sdpa-auto": lambda: op(*args, backend="reference", **kwargs)}
    for name, backend in SDPA_BACKENDS.items():
        def forced(backend=backend):
            with sdpa_kernel(backend):
                return op(*args, backend="reference", **kwargs)
        fns[f"sdpa-{name}"] = forced
    if device == "cuda":
        reason = op.availability("cuda").get("triton")
        if reason is None:
            fns["triton"] = lambda: op(*args, backend="triton", **kwargs)
        else:
            skipped["triton"] = reason
        if attention_mod._flash_attn_func() is None:
            skipped["flash_attn"] = "flash-attn is not installed"
        elif dtype == torch.float32:
            skipped["flash_attn"] = "flash-attn takes 16-bit inputs only"
        else:  # called directly: it runs whether or not the registry lists it
            fns["flash_attn"] = lambda: attention_mod.attention_flash_attn(*args, **kwargs)
    else:
        skipped["triton"] = "on the CPU Triton runs only in its interpreter, which is not a benchmark"
    reason = op.availability(device).get("native")
    if reason is None:
        fns["native"] = lambda: op(*args, backend="native", **kwargs)
    else:
        skipped["native"] = reason
    # Keep only what runs here (SDPA backends refuse some devices, dtypes and head dims).
    runnable = {}
    for name, fn in fns.items():
        try:
            with torch.no_grad():
                fn()
            runnable[name] = fn
        except RuntimeError as exc:  # includes CUDA out-of-memory for the math backend
            skipped[name] = str(exc).strip().splitlines()[0][:160]
            if device == "cuda":
                torch.cuda.empty_cache()
    return runnable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                   help="default: bfloat16 on CUDA, float32 and bfloat16 on the CPU")
    p.add_argument("--shape", nargs=4, type=int, action="append", metavar=("B", "H", "N", "d"),
                   help="repeatable; default: the DiT shapes above for the device")
    p.add_argument("--features", nargs="+", default=list(FEATURES), choices=FEATURES)
    p.add_argument("--repeats", type=int, help="default: 30 on CUDA, 5 on the CPU")
    p.add_argument("--out", default="bench/results/attention.json")
    args = p.parse_args(argv)

    device = args.device
    on_cuda = device.startswith("cuda")
    dtypes = args.dtype or (["bfloat16"] if on_cuda else ["float32", "bfloat16"])
    shapes = [tuple(s) for s in args.shape] if args.shape else (CUDA_SHAPES if on_cuda else CPU_SHAPES)
    repeats = args.repeats or (30 if on_cuda else 5)
    warmup = 5 if on_cuda else 1
    note = None if on_cuda else ("CPU: reference, SDPA backends and native only; the Triton kernel runs on the "
                                 "CPU only in its interpreter, which is not a benchmark")
    print(f"device: {device_description(device)['name']}")
    if note:
        print(note)
    results, skipped_all = [], {}
    print(f"{'shape':>22} {'dtype':>9} {'features':>13} {'backend':>15} {'ms':>9} {'TFLOP/s':>8} "
          f"{'x ref':>6} {'x best sdpa':>11}")
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for features in args.features:
                gen = torch.Generator().manual_seed(0)
                inputs, kwargs = make_inputs(shape, dtype, device.split(":")[0], features, gen)
                skipped = {}
                fns = candidates(device.split(":")[0], dtype, inputs, kwargs, skipped)

                def no_grad(fn):
                    def run():
                        with torch.no_grad():
                            fn()
                    return run

                times = median_times({n: no_grad(f) for n, f in fns.items()}, device, warmup=warmup,
                                     repeats=repeats)
                ref = times["sdpa-auto"]
                best_sdpa = min(t for n, t in times.items() if n.startswith("sdpa-"))
                for name, t in times.items():
                    tflops = flops(shape) / t / 1e12
                    results.append({"shape": list(shape), "dtype": dtype_name, "features": features,
                                    "backend": name, "median_ms": round(t * 1e3, 4), "tflops": round(tflops, 4),
                                    "speedup_vs_reference": round(ref / t, 3),
                                    "speedup_vs_best_sdpa": round(best_sdpa / t, 3)})
                    print(f"{str(shape):>22} {dtype_name:>9} {features:>13} {name:>15} {t * 1e3:9.2f} "
                          f"{tflops:8.3f} {ref / t:6.2f} {best_sdpa / t:11.2f}")
                for name, reason in skipped.items():  # backend -> reason -> the cases it covers
                    skipped_all.setdefault(name, {}).setdefault(reason, []).append(
                        f"{list(shape)} {dtype_name} {features}")
                del inputs, kwargs, fns
                if on_cuda:
                    torch.cuda.empty_cache()
    for name, reasons in skipped_all.items():
        print(f"skipped {name}: {'; '.join(reasons)}")
    write_json(args.out, {"benchmark": "attention forward", "device": device_description(device),
                          "versions": versions(), "note": note,
                          "flops_per_forward": "4 * B * H * N^2 * d", "skipped": skipped_all,
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
