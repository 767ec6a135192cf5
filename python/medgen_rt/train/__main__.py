"""torchrun --nproc-per-node N -m medgen_rt.train STAGE --config ... --out ..."""
import argparse
import logging
import sys

from medgen_rt.cli.train import run
from medgen_rt.train.run import add_arguments

parser = argparse.ArgumentParser(prog="python -m medgen_rt.train")
add_arguments(parser)
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
sys.exit(run(parser.parse_args()))
