"""Entry point of the ``wetok`` command. Subcommands are thin clients of the library."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

from ..errors import WetokError, describe_error, printable
from .options import Parser

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

    parser = Parser(
        prog="wetok",
        description="WeTok discrete visual tokenizer: encode images to tokens, decode, train, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"wetok {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (to stderr)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    parser.set_defaults(_commands=subparsers.choices)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (temporary files, process groups) runs."""


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


@contextlib.contextmanager
def _cli_process(command: str) -> Iterator[None]:
    """For the run of one command: SIGTERM raises :class:`Terminated`; Python warnings (e.g. Pillow's) print as
    one escaped line ``wetok CMD: warning: ...``. Both are restored afterwards."""
    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"wetok {command}: warning: {printable(message)}", file=sys.stderr)

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminate)
    shown, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``wetok ARGV``. Exit codes: 0 done; 2 bad input or usage (one line per problem on stderr, plus
    ``N of M inputs failed`` for batches); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser, whose --help lists what it takes
        (args._commands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLineFormatter("%(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    prefix = f"wetok {args.command}"
    try:
        with _cli_process(args.command):
            return int(args.func(args) or 0)
    except WetokError as err:
        print(f"{prefix}: error: {printable(err)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `wetok info | head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Terminated:
        print(f"{prefix}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError, RecursionError) as err:
        # File-system errors and exhausted resources that no code path turned into a WetokError: still one line.
        print(f"{prefix}: error: {describe_error(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001  the promise is one line, never a traceback; -v shows it
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"{prefix}: error: {describe_error(err)} (run with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
