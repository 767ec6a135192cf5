"""Sampling on several GPUs (or CPU processes):

    torchrun --nproc-per-node N -m medgen_rt.sample [the options of `medgen sample`]

Each rank makes every N-th volume with its own seed (seed + index) and rank 0
writes the merged summary.json; see medgen_rt.cli.sample.

Only for `python -m`: importing this module would replace the function
``medgen_rt.sample`` with it, so nothing imports it.
"""
import sys

from medgen_rt.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
