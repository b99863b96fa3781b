"""``wetok train CONFIG [key=value ...] --output DIR [--resume]``: train a tokenizer (stage 1 or 2) or a generator
(WeTok-AR on token shards)."""

from __future__ import annotations

import argparse
import typing

from ..errors import InputError

_USAGE = "wetok train CONFIG [KEY=VALUE ...] -o DIR [--resume]"


def _options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("-o", "--output", required=required, metavar="DIR",
                   help="run folder: checkpoints, logs, image grids, the resolved config")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        usage=_USAGE,
        help="train a tokenizer (stage 1 or 2) or a generator from a YAML recipe",
        description="Train a tokenizer, or with trainer.task=generator (task: generator in the recipe) a "
        "class-conditional WeTok-AR generator on token shards made by `wetok tokenize`. CONFIG is a YAML recipe "
        "(configs/train/*.yaml); KEY=VALUE arguments override it (e.g. data.train=/data/imagenet/train "
        "optim.lr=2e-4 trainer.max_steps=1000), before or after the options. Multi-GPU: set trainer.devices, or "
        "launch under torchrun / SLURM. A killed run continues exactly with --resume.",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML training recipe")
    # argparse cannot mix positionals after options in a subcommand; the rest is parsed in run()
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="recipe overrides, section.key=value")
    _options(p, required=False)
    p.set_defaults(func=run)


class _RestParser(argparse.ArgumentParser):
    """Parses what follows CONFIG; a problem is one InputError line, not argparse's usage text and exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise InputError("arguments", f"{message} (usage: {_USAGE})")


def _parse_rest(args: argparse.Namespace) -> tuple[list[str], str, bool]:
    sub = _RestParser(prog="wetok train", usage=_USAGE, add_help=False)
    sub.add_argument("overrides", nargs="*")
    _options(sub, required=False)
    rest = sub.parse_intermixed_args(args.rest)
    output = rest.output or args.output
    if output is None:
        raise InputError("arguments", "--output DIR is required")
    return rest.overrides, output, bool(rest.resume or args.resume)


def run(args: argparse.Namespace) -> int:
    from ..train import load_config, train

    overrides, output, resume = _parse_rest(args)
    cfg = load_config(args.config, overrides)
    last = train(cfg, output, resume=resume)
    if last is not None:
        print(f"last checkpoint: {last}")
    return 0
