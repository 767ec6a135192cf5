"""torchrun --nproc-per-node N -m medgen_rt.train STAGE --config ... --out ...
(the same arguments and error handling as `medgen train`)."""
import sys

from medgen_rt.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
