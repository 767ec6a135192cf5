"""End-to-end sampling benchmark: time, peak memory and energy per volume of the
medgen_rt runtime against the straightforward eager path of the same model, in
one run, each in a fresh child process (random weights: speed and memory do not
depend on training).

    medgen_rt: the fastest backends of the op registry, the denoiser in bf16 on GPU,
               streamed decoding with the planner's chunk (max_vram 8 GB; MedLoRD 24 GB).
    eager:     the reference ops (MEDGEN_BACKEND=reference), float32, the whole
               latent decoded at once (what the published scripts do).

Configs: "ct" (DiT-B/2 on the ct-ds8 latent of a 512x512x256 CT, 50 DDIM steps),
"cine" (DiT4D-B on the published CMR latent: 6 slices of 256x256x32 ->
(8, 6, 64, 64, 8)) and "medlord" (MedLoRD's path: U-Net 64/128/256/512 with the
lightweight ControlNet on six masks at image size, ct-ds4 latent 128x128x64 of a
512x512x256 CT, 50 DDIM steps, unguided as the published sampler). --small shrinks
them to sizes this 2-core CPU runs in minutes.

    python bench/e2e.py --small --out bench/results/e2e-small-cpu.json
    python bench/e2e.py --configs medlord --device cuda --out bench/results/e2e-medlord-h100.json
    python bench/e2e.py --device cuda --out bench/results/e2e-h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import device_description, versions, write_json  # noqa: E402

MEDLORD = "unet-medlord+controlnet"  # U-Net preset "medlord" + lightweight ControlNet, six masks
CONFIGS = {
    # name: (denoiser: DiT preset or MEDLORD, VQ-GAN preset, latent (C, *spatial), steps)
    "ct": ("dit3d-b/2", "ct-ds8", (8, 64, 64, 32), 50),
    "cine": ("dit4d-b", "cmr", (8, 6, 64, 64, 8), 50),
    "medlord": (MEDLORD, "ct-ds4", (8, 128, 128, 64), 50),
}
SMALL = {
    "ct": ("dit3d-b/2", "ct-ds8", (8, 16, 16, 8), 10),  # a 128x128x64 CT
    "cine": ("dit4d-b", "cmr", (8, 2, 16, 16, 4), 10),  # 2 slices of 64x64x16
    "medlord": (MEDLORD, "ct-ds4", (8, 16, 16, 8), 10),  # a 64x64x32 CT
}


def _peak_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _denoiser(name: str, latent: tuple, factor: int):
    """(network, mask or None) with random weights; the MedLoRD mask is six one-hot labels at image size."""
    import torch

    if name == MEDLORD:
        from medgen_rt.models.unet import ControlledUNet, UNetDenoiser, unet_config

        base = UNetDenoiser(unet_config("medlord", in_channels=latent[0], out_channels=latent[0], out_silu=False))
        net = ControlledUNet(base, mask_channels=6, mask_downsample=factor, variant="lightweight").eval()
        labels = torch.randint(0, 7, (1, *(s * factor for s in latent[1:])), generator=torch.Generator().manual_seed(1))
        return net, torch.stack([labels == k for k in range(1, 7)], dim=1).float()
    from medgen_rt.models.dit import DiT, dit_config

    net = DiT(dit_config(name, input_size=latent[1:], in_channels=latent[0])).eval()
    for block in net.blocks:  # published init zeroes adaLN: give the blocks work to do
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    return net, None


def child(mode: str, config: tuple, device_name: str, energy: bool) -> dict:
    import torch

    from medgen_rt import diffusion as D
    from medgen_rt.models.vqgan import build_vqgan
    from medgen_rt.runtime.energy import EnergyMeter
    from medgen_rt.sampling.api import decode_latent
    from medgen_rt.sampling.planner import plan_sampling

    net_name, vae_name, latent, steps = config
    device = torch.device(device_name)
    torch.manual_seed(0)
    vae = build_vqgan(vae_name).eval()
    net, mask = _denoiser(net_name, latent, vae.downsample_factor[0])
    schedule = D.make_schedule("linear", 1000)
    meter = EnergyMeter(enabled=energy)
    noise = torch.randn((1,) + tuple(latent), generator=torch.Generator().manual_seed(0))
    if mode == "medgen_rt":
        # MedLoRD's claim is a 24 GB card; the DiT paths are planned for 8 GB
        budget = "24GB" if net_name == MEDLORD else "8GB"
        plan = plan_sampling(net.to(device), vae.to(device), latent, max_vram=budget, device=device)
        vae.to("cpu")
        dtype = getattr(torch, plan.denoiser_dtype)
        net.to(dtype)
    else:
        plan, dtype = None, torch.float32
        net.to(device)
    fn = D.network_fn(net, mask is not None, dtype)
    cond = mask.to(device) if mask is not None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with meter.phase("denoise"), torch.no_grad():
        z = D.sample(fn, noise.shape, schedule, sampler="ddim", steps=steps, noise=noise.to(device), device=device,
                     cond=cond)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    denoise_peak = _peak_gb(device)
    net.to("cpu")
    vae.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t2 = time.perf_counter()
    with meter.phase("decode"), torch.no_grad():
        if mode == "medgen_rt":
            image = decode_latent(vae, z, plan.decode_chunk, axis=plan.decode_axis)
        else:
            image = vae.decode(z).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t3 = time.perf_counter()
    report = meter.report(per=1)
    return {"mode": mode, "denoise_s": round(t1 - t0, 3), "decode_s": round(t3 - t2, 3),
            "total_s": round(t3 - t0 - (t2 - t1), 3), "peak_gb": {"denoise": denoise_peak, "decode": _peak_gb(device)},
            "peak_kind": "CUDA max allocated" if device.type == "cuda" else "process peak RSS (cumulative)",
            "kwh": report["kwh"], "kg_co2e": report["kg_co2e"], "output_shape": list(image.shape),
            "plan": plan.to_dict() if plan else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU-sized latents and 10 steps")
    p.add_argument("--configs", nargs="+", default=["ct", "cine"], choices=sorted(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-energy", action="store_true")
    p.add_argument("--out", default="bench/results/e2e.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    table = SMALL if args.small else CONFIGS
    if args.child:
        print(json.dumps(child(args.child, table[args.config], args.device, not args.no_energy)))
        return 0
    results = {}
    for name in args.configs:
        results[name] = {"denoiser": table[name][0], "vqgan": table[name][1], "latent": list(table[name][2]),
                         "steps": table[name][3]}
        for mode in ("medgen_rt", "eager"):
            env = dict(os.environ)
            if mode == "eager":
                env["MEDGEN_BACKEND"] = "reference"
            cmd = [sys.executable, __file__, "--child", mode, "--config", name, "--device", args.device]
            cmd += ["--small"] if args.small else []
            cmd += ["--no-energy"] if args.no_energy else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            results[name][mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(name, mode, {k: v for k, v in results[name][mode].items() if k != "plan"})
        fast, eager = results[name]["medgen_rt"], results[name]["eager"]
        results[name]["eager_time_over_medgen_rt"] = round(eager["total_s"] / fast["total_s"], 3)
        results[name]["decode_peak_eager_over_medgen_rt"] = round(eager["peak_gb"]["decode"]
                                                                   / fast["peak_gb"]["decode"], 3)
    write_json(args.out, {"benchmark": "end-to-end sampling, medgen_rt vs eager", "small": args.small,
                          "device": device_description(args.device), "versions": versions(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
