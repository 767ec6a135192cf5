"""The memory planner's plans for bench/e2e.py's paths at their published sizes, for CUDA
cards of the given sizes, made on this machine (analytic: random weights on the CPU; the
costs do not depend on the weights). Unguided, as the published samplers run.

    python bench/plan.py --configs medlord --max-vram 24GB 8GB
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from e2e import CONFIGS, _denoiser  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["medlord"], choices=sorted(CONFIGS))
    p.add_argument("--max-vram", nargs="+", default=["24GB", "8GB"])
    args = p.parse_args(argv)
    import torch

    from medgen_rt.models.vqgan import build_vqgan
    from medgen_rt.sampling.planner import plan_sampling

    for name in args.configs:
        net_name, vae_name, latent, _ = CONFIGS[name]
        torch.manual_seed(0)
        vae = build_vqgan(vae_name).eval()
        net, _ = _denoiser(net_name, latent, vae.downsample_factor[0])
        for limit in args.max_vram:
            print(f"{name}: {net_name} + {vae_name}, latent {'x'.join(map(str, latent))}")
            try:
                plan = plan_sampling(net, vae, latent, max_vram=limit, device="cuda", measure=False)
                print(plan.describe())
            except ValueError as e:
                print(f"  refused: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
