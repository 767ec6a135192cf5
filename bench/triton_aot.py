"""Compile every Triton kernel of kernels/ ahead of time for sm_80 and sm_90, no GPU needed.

    python bench/triton_aot.py                       # fast cases, sm_80 + sm_90, table on stdout
    python bench/triton_aot.py --all --json bench/results/triton-aot-kernels.json

The launchers in kernels/ are called as the models call them (DiT presets' hidden
sizes, head dims and token counts; VQ codebooks; decoder tiles) on meta tensors,
under a stand-in Triton driver that names the target: each `kernel[grid](...)`
becomes a warm-up compile (the JIT's own argument specialization, the launchers'
own block sizes and warps) and every autotuner candidate is compiled. Registers
and local memory come from cuobjdump on the cubin (Triton's bundled one), shared
memory from Triton's metadata plus the cubin's static shared memory. The sm_80
build stands in for sm_86/89 too (Triton emits the same code for 8.x), checked
against their 99 KB. Exit code 1 on a compile error, a kernel no case launches,
a fixed launch above the per-block shared memory, 255 registers, 64K registers
per block or with local memory (spills), or an autotuned launch none of whose
candidates fits a target (a candidate that does not fit is only a warning: the
autotuner skips it). Exit code 77 when triton, ptxas or cuobjdump is missing.
Compiles land in Triton's cache (TRITON_CACHE_DIR), so a second run takes seconds.
Must run with TRITON_INTERPRET unset or 0: under the interpreter triton.jit
returns interpreted functions, which cannot be compiled.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Per-block opt-in maximum of dynamic + static shared memory (CUDA programming guide,
# compute capabilities table): 227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/89.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGS_PER_BLOCK = 65536

# embedded models by name where their denoiser is a DiT (ct-tiny: the TGCA's base); the cine default
# cmr4d-tiny is a MONAI U-Net, which calls no medgen kernel
FAST = ["dit3d-b/2", "dit3d-tiny", "dit4d-tiny", "ct-tiny"]
SLOW = ["dit3d-s/2", "dit3d-l/2", "dit3d-b/4", "dit4d-b"]
DEFAULT_MODELS = Path(__file__).resolve().parents[1] / "python/medgen_rt/default_models"


def missing_tools() -> str | None:
    """Why the compile cannot run here, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: triton.jit gives interpreted functions"
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as exc:  # noqa: BLE001 - any broken install means: skip
        return f"triton with its NVIDIA backend is not importable: {exc}"
    for arch in (80, 90):
        try:
            path = get_ptxas(arch).path
        except Exception as exc:  # noqa: BLE001
            return f"no ptxas for sm_{arch}: {exc}"
        if not path or not os.access(path, os.X_OK):
            return f"no ptxas for sm_{arch} (looked at {path})"
    if not os.access(_cuobjdump(), os.X_OK):
        return f"no cuobjdump at {_cuobjdump()}"
    return None


def _cuobjdump() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    return str(bundled) if bundled.exists() else "/usr/local/cuda/bin/cuobjdump"


def _dit(name: str):
    """A DiTConfig from a preset or from an embedded default model's model.json."""
    from medgen_rt.models.dit import DiTConfig, dit_config

    if (DEFAULT_MODELS / name).is_dir():
        for part in ("dit", "tgca"):
            path = DEFAULT_MODELS / name / part / "model.json"
            if path.is_file():
                spec = json.loads(path.read_text())
                return DiTConfig(**(spec["base"] if part == "tgca" else spec)["config"])
    return dit_config(name)


def _dit_launches(tag, cfg, dt, e, K, all_variants):
    """The launches of one DiT forward (and the fused backwards) at its preset's shapes."""
    import torch

    adaln, gated, lgr, pe, attn = K
    C, H, P = cfg.hidden_size, cfg.num_heads, cfg.patch_size
    d, grid = C // H, [s // p for s, p in zip(cfg.input_size, P)]
    N, B, mlp = math.prod(grid), 2, int(C * cfg.mlp_ratio)  # B=2: guided sampling
    x, mod, stats = e(B, N, C, dtype=dt), e(B, C, dtype=dt), e(B * N, dtype=torch.float32)
    # q, k, v as the DiT block makes them: views of one packed qkv projection.
    qkv = e(B, N, 3, H, d, dtype=dt).permute(2, 0, 3, 1, 4)
    rope = (e(N, d, dtype=torch.float32), e(N, d, dtype=torch.float32))
    norm = (e(d, dtype=torch.float32), e(d, dtype=torch.float32), 1e-6)
    cases = [
        (f"{tag}/adaln_modulate_fwd", lambda: adaln.forward(x, mod, mod, 1e-6, True)),
        (f"{tag}/adaln_modulate_bwd", lambda: adaln.backward(x, x, mod, stats, stats)),
        (f"{tag}/gated_residual_fwd", lambda: gated.forward(x, mod, x)),
        (f"{tag}/gated_residual_bwd", lambda: gated.backward(x, mod, x, True, True)),
        (f"{tag}/proj", lambda: lgr.forward(x, mod, x, e(C, C, dtype=dt), e(C, dtype=dt))),
        (f"{tag}/fc2", lambda: lgr.forward(x, mod, e(B, N, mlp, dtype=dt), e(C, mlp, dtype=dt), e(C, dtype=dt))),
        (f"{tag}/patch_embed", lambda: pe.patch_embed_forward(
            e(B, cfg.in_channels, *cfg.input_size, dtype=dt), e(C, cfg.in_channels * math.prod(P), dtype=dt),
            e(C, dtype=dt), e(N, C, dtype=dt), P)),
        (f"{tag}/unpatchify", lambda: pe.unpatchify_forward(
            e(B, N, math.prod(P) * cfg.out_channels, dtype=dt), grid, P, cfg.out_channels)),
        (f"{tag}/attention", lambda: attn.forward(*qkv.unbind(0), rope=rope if cfg.rope else None,
                                                  q_norm=norm if cfg.qk_norm else None,
                                                  k_norm=norm if cfg.qk_norm else None)),
    ]
    if all_variants:  # RoPE and qk-norm are options of every published size (DESIGN.md section 4)
        cases.append((f"{tag}/attention_rope_qknorm",
                      lambda: attn.forward(*qkv.unbind(0), rope=rope, q_norm=norm, k_norm=norm)))
    return cases


def launches(presets, dtypes):
    """(case name, callable) pairs; each callable runs one launcher on meta tensors."""
    import torch

    from medgen_rt.kernels import adaln_modulate, attention, gated_residual, linear_gated_residual, patch_embed
    from medgen_rt.kernels import tile_blend as tb, vq_nearest as vq

    def e(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    K = (adaln_modulate, gated_residual, linear_gated_residual, patch_embed, attention)
    out = []
    for name in presets:
        cfg = _dit(name)
        for dt in dtypes:
            out += _dit_launches(f"{name}-{str(dt)[6:]}", cfg, dt, e, K, all_variants=not name.endswith("tiny"))
    # VQ-GAN codebooks (4096 x 8 for ct-ds8, 16384 x 8 for ct-ds4 / cmr) on a 64x64x32 latent.
    for K_, dt in ((4096, torch.float32), (16384, torch.bfloat16)):
        out.append((f"vq_nearest-{K_}-{str(dt)[6:]}",
                    lambda K_=K_, dt=dt: vq.vq_nearest(e(64 * 64 * 32, 8, dtype=dt), e(K_, 8, dtype=torch.float32))))
    # Decoder tiles blended into a 512x512x256 volume, float32, with and without weights.
    vol, wsum = e(1, 1, 512, 512, 256, dtype=torch.float32), e(512, 512, 256, dtype=torch.float32)
    region = (slice(0, 96), slice(0, 512), slice(0, 256))
    out.append(("tile_blend-weighted", lambda: tb.tile_blend(vol, wsum, e(1, 1, 96, 512, 256, dtype=torch.float32),
                                                             region, e(96, 512, 256, dtype=torch.float32))))
    out.append(("tile_blend-plain", lambda: tb.tile_blend(vol, None, e(1, 1, 96, 512, 256, dtype=torch.float32),
                                                          region)))
    return out


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]), "stack_bytes": int(fields["STACK"]),
            "static_shared": int(fields["SHARED"])}


def _name(fn) -> str:
    return f"{fn.module.rsplit('.', 1)[-1]}.{fn.__name__}"


def all_kernels() -> set:
    """Every @triton.jit function in kernels/ named *_kernel (the rest are device helpers)."""
    import importlib
    import pkgutil

    import medgen_rt.kernels as pkg
    from triton.runtime.jit import JITFunction

    out = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        out |= {_name(v) for v in vars(mod).values() if isinstance(v, JITFunction) and v.__name__.endswith("_kernel")}
    return out


def compile_all(archs, presets, dtypes) -> list:
    """One record per distinct compiled kernel and arch."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class AotDriver:  # what JITFunction.run asks of the driver before it compiles
        def __init__(self, arch):
            self.target = GPUTarget("cuda", arch, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return f"aot-sm{self.target.arch}"  # a device key per arch: separate JIT caches

        def get_current_stream(self, device=None):
            return 0

    seen, records, tuned, state = {}, [], [], {"case": None, "autotuned": None}
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):  # compile, never launch
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (kernel.hash, kernel.metadata.target.arch)
        if key not in seen:
            md = kernel.metadata
            res = _resources(kernel.asm["cubin"])
            seen[key] = rec = {"kernel": _name(self), "arch": md.target.arch, "cases": [],
                               "autotune_candidate": state["autotuned"] is not None, "num_warps": md.num_warps,
                               "num_stages": md.num_stages, "shared_bytes": md.shared + res["static_shared"],
                               **res}
            records.append(rec)
        seen[key]["cases"].append(state["case"])
        if state["autotuned"] is not None:
            state["autotuned"].append(seen[key])
        return kernel

    def tuner(self, *args, warmup=False, **kwargs):  # every candidate config, not the benchmarked winner
        state["autotuned"] = []
        try:
            return self.warmup(*args, **kwargs)
        finally:
            tuned.append({"case": state["case"], "candidates": state["autotuned"]})
            state["autotuned"] = None

    JITFunction.run, Autotuner.run = run, tuner
    before = driver._active  # reset_active() would create the real driver, which fails without a GPU
    try:
        for arch in archs:
            driver.set_active(AotDriver(arch))
            for case, fn in launches(presets, dtypes):
                state["case"] = case
                try:
                    fn()
                except Exception as exc:  # a compile error is a finding, not a crash
                    records.append({"kernel": case, "arch": arch, "cases": [case], "error": f"{type(exc).__name__}: "
                                    f"{str(exc)[-1500:]}"})
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver._active = before
    return records, tuned


def _targets(arch: int) -> list:
    # sm_86/89 (the 24 GB workstation cards) run Triton's sm_80 code, with 99 KB shared per block.
    return [80, 86] if arch == 80 else [arch]


def _violations(r) -> list:
    out = [f"{r['shared_bytes']} B shared > {SHARED_LIMIT[t]} of sm_{t}" for t in _targets(r["arch"])
           if r["shared_bytes"] > SHARED_LIMIT[t]][:1]
    if r["registers"] > 255 or r["registers"] * 32 * r["num_warps"] > REGS_PER_BLOCK:
        out.append(f"{r['registers']} registers x {32 * r['num_warps']} threads")
    if r["local_bytes"]:
        out.append(f"{r['local_bytes']} B local memory per thread (spills)")
    return out


def problems(records, archs, expected, tuned=()) -> tuple:
    """(problems, warnings). Problems: compile errors, kernels of `expected` no case compiled,
    limits broken by a fixed launch, autotuned launches with no candidate that fits a target.
    Warnings: candidates the autotuner will find it cannot launch, or that spill."""
    compiled = {(r["kernel"], r["arch"]) for r in records if "error" not in r}
    bad = [f"{k} sm_{a}: never launched by any case (add one to bench/triton_aot.py)"
           for k in sorted(expected) for a in archs if (k, a) not in compiled]
    warn = []
    for r in records:
        where = f"{r['kernel']} sm_{r['arch']} ({', '.join(r['cases'][:3])})"
        if "error" in r:
            bad.append(f"{where}: does not compile: {r['error']}")
            continue
        (warn if r["autotune_candidate"] else bad).extend(f"{where}: {v}" for v in _violations(r))
    for launch in tuned:
        cands = launch["candidates"]
        for t in _targets(cands[0]["arch"]) if cands else []:
            if all(c["shared_bytes"] > SHARED_LIMIT[t] for c in cands):
                bad.append(f"{cands[0]['kernel']} sm_{t} ({launch['case']}): no autotuner candidate fits "
                           f"{SHARED_LIMIT[t]} B shared (smallest {min(c['shared_bytes'] for c in cands)} B)")
    return sorted(set(bad)), sorted(set(warn))


def table(records) -> str:
    rows = [f"{'kernel':40} {'sm':>3} {'warps':>5} {'stages':>6} {'regs':>4} {'local':>5} {'shared':>7}  "
            f"{'fits sm_86':>10}  cases"]
    for r in sorted(records, key=lambda r: (r["kernel"], r["arch"], -r.get("shared_bytes", 0))):
        if "error" in r:
            rows.append(f"{r['kernel']:40} {r['arch']:>3} ERROR {r['error'][:200]}")
            continue
        fits = "" if r["arch"] != 80 else ("yes" if r["shared_bytes"] <= SHARED_LIMIT[86] else "NO")
        name = r["kernel"] + (" (tune)" if r["autotune_candidate"] else "")
        rows.append(f"{name:40} {r['arch']:>3} {r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>4} "
                    f"{r['local_bytes']:>5} {r['shared_bytes']:>7}  {fits:>10}  {', '.join(r['cases'][:2])}"
                    + (f" +{len(r['cases']) - 2}" if len(r["cases"]) > 2 else ""))
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--presets", nargs="+", help=f"DiT presets or embedded models (default: {' '.join(FAST)})")
    p.add_argument("--all", action="store_true", help=f"also {' '.join(SLOW)} and float32")
    p.add_argument("--dtypes", nargs="+", help="bfloat16 float32 float16 (default bfloat16; --all: both first two)")
    p.add_argument("--json", help="write the records here")
    args = p.parse_args(argv)
    reason = missing_tools()
    if reason:
        print(f"skipped: {reason}")
        return 77  # the test maps this to pytest.skip
    import torch

    presets = args.presets or (FAST + SLOW if args.all else FAST)
    dtypes = [getattr(torch, t) for t in args.dtypes or (["bfloat16", "float32"] if args.all else ["bfloat16"])]
    records, tuned = compile_all(args.arch, presets, dtypes)
    print(table(records))
    bad, warn = problems(records, args.arch, all_kernels(), tuned)
    if args.json:
        import triton

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "archs": args.arch, "presets": presets,
                                               "dtypes": [str(t)[6:] for t in dtypes],
                                               "problems": bad, "warnings": warn,
                                               "kernels": records}, indent=1) + "\n")
    for line in warn:
        print("warning:", line)
    for line in bad:
        print("PROBLEM:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
