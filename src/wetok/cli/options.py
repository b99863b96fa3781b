"""Validated command-line options shared by the subcommands: argparse ``type`` functions with ranges (seeds,
counts, devices), the one-line usage errors of :class:`Parser`, and ``--device`` / ``--seed`` / ``--max-pixels``.

Re-exported by :mod:`wetok.cli.common`, so commands use e.g. ``type=common.positive_int``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

import torch

from ..errors import printable


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line: ``wetok encode: error: argument --size: ... (see wetok encode
    --help)``, exit code 2. Subcommand parsers made by ``add_subparsers`` inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


#: Largest value accepted for the integer options (seeds excepted): beyond any real image side or count.
MAX_INT_OPTION = 2**31 - 1
#: Largest --seed: seeds must fit the 64-bit generators of torch and numpy (negative seeds are refused).
MAX_SEED = 2**63 - 1


def int_range(low: int, high: int = MAX_INT_OPTION) -> Callable[[str], int]:
    """An argparse ``type``: a decimal integer in [low, high], else a usage error naming the range."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            upper = "" if high == MAX_INT_OPTION else f" and at most {high}"
            raise argparse.ArgumentTypeError(f"must be at least {low}{upper}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in [low, high] (or (low, high] with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value

    parse.__name__ = "number"
    return parse


#: ``--seed``: 0 <= seed < 2^63.
seed_type = int_range(0, MAX_SEED)
#: Counts of images, batches, tiles...: 1 <= n < 2^31.
positive_int = int_range(1)
#: Worker counts and other options where 0 means "none": 0 <= n < 2^31.
nonnegative_int = int_range(0)
#: Device types a model can run on (``meta`` has no data; others would fail in the middle of a run).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def device_type(text: str) -> str:
    """An argparse ``type`` for ``--device``: cpu, cuda, cuda:N, mps or xpu, and available on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use one of {', '.join(DEVICE_TYPES)})") from None
    if device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"cannot run on device {text!r} (use one of {', '.join(DEVICE_TYPES)})")
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and not (module is not None and module.is_available()):
        raise argparse.ArgumentTypeError(f"{text} requested but {device.type} is not available here")
    if device.index is not None and device.type != "cpu" and device.index >= module.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are {module.device_count()} {device.type} device(s)")
    return text


def add_device_option(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device``, validated by :func:`device_type`."""
    g.add_argument("--device", type=device_type, default=None,
                   help="torch device: cpu, cuda, cuda:N, mps, xpu (default: cuda if available, else cpu)")


def add_seed_option(p: argparse.ArgumentParser, help: str = "seed of the generative decoder's noise") -> None:
    """``--seed`` (default 0), validated by :data:`seed_type`."""
    p.add_argument("--seed", type=seed_type, default=0, help=f"{help} (default 0; 0 to 2^63 - 1)")


def add_max_pixels_option(p: argparse.ArgumentParser) -> None:
    """``--max-pixels``: the largest image (input, resized or padded, or output) a command works on; 0 = none."""
    from ..data import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=nonnegative_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse images of more than N pixels: inputs (checked from the file header, before "
                   f"decoding), and sizes after --size or padding (default {DEFAULT_MAX_PIXELS}, Pillow's "
                   "decompression-bomb limit; 0 = no limit)")


def apply_max_pixels(args: argparse.Namespace) -> None:
    """Make ``--max-pixels`` the limit of :mod:`wetok.data` (image decoding) for this run."""
    from ..data import set_max_pixels

    if hasattr(args, "max_pixels"):
        set_max_pixels(args.max_pixels)
