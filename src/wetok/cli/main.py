"""Entry point of the ``wetok`` command. Subcommands are thin clients of the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ..errors import WetokError

#: Modules in wetok.cli that each expose ``register(subparsers)``; their parsers set ``func=run``.
COMMAND_MODULES: tuple[str, ...] = (
    "encode",
    "decode",
    "reconstruct",
    "info",
    "inspect",
    "convert",
    "eval",
    "eval_gen",
    "train",
    "export",
    "export_onnx",
    "tokenize",
    "sample",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="wetok",
        description="WeTok discrete visual tokenizer: encode images to tokens, decode, train, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"wetok {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (to stderr)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except WetokError as err:
        print(f"wetok {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `wetok info | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"wetok {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
