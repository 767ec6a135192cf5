"""The ``medgen`` command. One module per verb; each exposes
``add_parser(subparsers)`` and ``run(args) -> int`` (the exit code)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import import_module

# verb -> module under medgen_rt.cli; imported only when that verb runs so that
# `medgen info` does not pay for the imports of training or sampling.
VERBS = {
    "info": "medgen_rt.cli.info",
    "phantom": "medgen_rt.cli.phantom",
    "train": "medgen_rt.cli.train",
    "encode": "medgen_rt.cli.encode",
    "sample": "medgen_rt.cli.sample",
    "convert": "medgen_rt.cli.convert",
    "export": "medgen_rt.cli.export",
    "eval": "medgen_rt.cli.eval",
    "share": "medgen_rt.cli.share",
}


# Errors that mean the user's input is wrong (a missing file, a bad value), not a bug.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    from medgen_rt import __version__

    parser = argparse.ArgumentParser(
        prog="medgen",
        description="Generative models of medical volumes: phantoms, training, sampling, export, evaluation.")
    parser.add_argument("--version", action="version", version=f"medgen_rt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in VERBS.values():
        import_module(module).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(import_module(VERBS[args.command]).run(args) or 0)
    except USER_ERRORS as exc:  # bad input: one readable line, no traceback
        print(f"medgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medgen: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`medgen info | head`): no traceback, and none at exit
        # when Python flushes stdout again (the recipe of the signal module's docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
