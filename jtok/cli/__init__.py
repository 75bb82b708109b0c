"""The `jtok` command line.

Every subcommand takes a model the same way: ``--preset NAME`` and/or ``--config FILE``
(JSON or YAML), then any number of ``--set dotted.key=value`` overrides. User mistakes
end with one line on stderr and exit status 2, never a traceback. One module per command
group: `model` (info, config), `bench`, `data`, `run` (train, eval, sample), `studies` (sweep,
fit, demo); `common` holds what they share. Argument errors argparse finds (a bad int, an
unknown choice) are one line too: `_Parser.error` raises instead of printing the usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from jtok import __version__
from jtok.cli import bench, checkpoint, data, hf, inference, model, run, studies
from jtok.errors import JTokError, environment_errno, environment_message


class ArgumentsError(JTokError):
    """argparse rejected the command line; `prog` is the (sub)command, e.g. "jtok bench"."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (main prints them), not usage + exit."""

    def error(self, message: str):
        raise ArgumentsError(self.prog, " ".join(message.split()))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jtok",
        description="Token-indexed parameter scaling (JTok, JTok-M) for PyTorch language "
        "models: build, count and benchmark models.",
    )
    parser.add_argument("--version", action="version", version=f"jtok {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for group in (model, bench, data, run, inference, hf, checkpoint, studies):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ArgumentsError as err:
        print(f"{err.prog}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help, --version: printed, nothing to run
        return done.code if isinstance(done.code, int) else 0
    args.preset_given = getattr(args, "preset", None) is not None

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        # A warning (a dropped half-written metrics line, ...) is one line like an error,
        # not Python's two (message and source line).
        print(f"jtok {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            code = args.handler(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return code
    except JTokError as err:
        message = str(err).replace("\r", " ").replace("\n", " ")  # one line, whatever it holds
        print(f"jtok {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jtok {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `jtok ... | head`: the reader left; quietly stop writing (and keep Python from
        # complaining again while it flushes stdout at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:
        number = environment_errno(err)
        if number is None:
            raise  # not the machine's state: a defect, with its traceback
        # A full disk, a read-only or forbidden path (also stdout: `> /dev/full`): what was
        # being written stays as it was (every writer is atomic); say so in one line.
        print(f"jtok {args.command}: error: {environment_message(err, number)}",
              file=sys.stderr)
        try:
            sys.stdout.flush()
        except OSError:  # stdout itself cannot be written: keep exit's flush quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2


if __name__ == "__main__":
    sys.exit(main())
