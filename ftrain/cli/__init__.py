"""Supervisor side (outside the training processes): the ``ftrain`` command: ``launch``, ``rendezvous``, ``ckpt``,
``status`` and ``goodput``.

Every subcommand turns an :class:`FtrainError` into one line on stderr and the
error's exit code (see ``exitcodes.py``). That line is sanitised
(:func:`ftrain.errors.printable`): messages quote file content and paths.
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ftrain import __version__, exitcodes
from ftrain.cli import ckpt, goodput, launch, rendezvous
from ftrain.errors import FtrainError, printable


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse's default prints usage too)
        self.exit(exitcodes.USAGE, f"ftrain: error: {printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ftrain", description="Fault-tolerant PyTorch training.")
    parser.add_argument("--version", action="version", version=f"ftrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ckpt.add_parser(sub)
    launch.add_parser(sub)
    rendezvous.add_parser(sub)
    goodput.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FtrainError as e:
        # The message may quote a checkpoint's content (an unknown format version, a metric name) or a path
        # holding any byte: escaped, so it stays one line and cannot drive the terminal.
        print(f"ftrain: error: {printable(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
