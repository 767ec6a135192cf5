"""`medgen info`: versions, compiled native parts, backends and devices."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, compiled kernels, backends and GPUs seen")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    from medgen_rt.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
