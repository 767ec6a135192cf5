"""The ``medgen`` command. One module per verb; each exposes
``add_parser(subparsers)`` and ``run(args) -> int`` (the exit code)."""
from __future__ import annotations

import argparse
import errno
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


# Errors that mean the user's input is wrong (a missing file, a bad value), or that the
# machine refused (read-only, disk full, name too long), not a bug. OSError covers
# FileNotFoundError and FileExistsError; ValueError covers UnicodeError.
USER_ERRORS = (ValueError, OSError)

# The plain reason for the errors a user can meet and fix; others keep the system's words.
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "not a folder (a file is in the way)",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "folder is not empty",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long for this file system",
    errno.ELOOP: "symbolic link loop",
    errno.EXDEV: "cannot move between file systems",
    errno.EIO: "input/output error",
}


def checked_type(convert, ok, what: str):
    """An argparse type: convert the text, then require ok(value); a bad value is refused
    when the command line is read, naming the option (argparse's `argument --x: ...`)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = checked_type(int, lambda v: v >= 1, "a positive integer")
nonneg_int = checked_type(int, lambda v: v >= 0, "a non-negative integer")
positive_float = checked_type(float, lambda v: 0 < v < float("inf"), "a positive number")


def _shown(name) -> str:
    """A file name as text: bytes that are not UTF-8 appear as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def error_message(exc: BaseException, out=None) -> str:
    """One line for a user error: the file first, then a plain reason. A failed write() names
    no file; `out` (the verb's --out, where its writes go) then says where it happened."""
    if isinstance(exc, OSError) and exc.errno is not None:
        reason = _REASONS.get(exc.errno) or exc.strerror or str(exc)
        names = [_shown(n) for n in (exc.filename, exc.filename2) if n is not None]
        if names:
            return f"{' -> '.join(names)}: {reason}"
        return f"{reason} (while writing the output, --out {_shown(out)})" if out is not None else reason
    if isinstance(exc, UnicodeError) and isinstance(getattr(exc, "object", None), str):
        # a name with bytes that are not UTF-8 cannot go into a JSON sidecar or report
        # the name around the bad character (a path, or a name in the JSON being written)
        text, start, end = exc.object, exc.start, exc.end
        first = max(text.rfind(c, 0, start) for c in '"\'\n\t,') + 1
        last = min([i for i in (text.find(c, end) for c in '"\'\n\t,') if i >= 0] or [len(text)])
        name = text[first:last].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return f"{name}: the name is not valid UTF-8 and cannot be recorded in a JSON file; rename it"
    return str(exc)


def check_argv_text(argv: list) -> None:
    """Refuse, before any work, arguments with bytes that are not UTF-8 (the shell passes them as
    lone surrogates): every path given is recorded in JSON sidecars, reports and run folders,
    which hold only UTF-8 text, so such a name would fail at the end of the work."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            option = argv[i - 1] if i > 0 and argv[i - 1].startswith("-") else "argument"
            raise ValueError(f"{option} {_shown(arg)}: the name is not valid UTF-8; rename it") from None


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
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        check_argv_text([str(a) for a in argv])
        return int(import_module(VERBS[args.command]).run(args) or 0)
    except BrokenPipeError:  # an OSError too: handled first
        # the reader went away (`medgen info | head`): no traceback, and none at exit
        # when Python flushes stdout again (the recipe of the signal module's docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except USER_ERRORS as exc:  # bad input or a refusing machine: one readable line, no traceback
        print(f"medgen {args.command}: error: {error_message(exc, getattr(args, 'out', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
