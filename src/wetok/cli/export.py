"""``wetok export CHECKPOINT -o DIR``: the EMA weights of a training checkpoint (tokenizer or generator) in the
native format."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from .._files import current_umask
from ..errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the EMA weights of a training checkpoint as a native model folder",
        description="Write config.json + model.safetensors (the EMA weights, or --raw for the live weights; the "
        "live ones when the run kept no EMA) of a `wetok train` checkpoint into DIR. A tokenizer run gives a "
        "folder for WeTok.from_pretrained / --model DIR; a generator run one for WeTokAR.from_pretrained, with "
        "its tokenizer in DIR/tokenizer when the run knew it.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoints/step-*.pt file, or a run folder (its last)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output model folder")
    p.add_argument("--raw", action="store_true", help="export the live (non-EMA) weights")
    p.set_defaults(func=run)


def export(checkpoint: str | Path, output: str | Path, *, ema: bool = True) -> Path:
    """Write the model of a training checkpoint (or of a run folder's last checkpoint) to ``output``."""
    from ..train.generator import generator_from_checkpoint
    from ..train.module import load_training_checkpoint, model_from_checkpoint
    from ..train.run import LAST_POINTER, latest_checkpoint, pointed_checkpoint

    checkpoint, output = Path(checkpoint), Path(output)
    if checkpoint.is_dir():
        last = latest_checkpoint(checkpoint)
        if last is None:
            raise InputError(checkpoint, "holds no checkpoints/step-*.pt")
        checkpoint = last
    elif checkpoint.name == LAST_POINTER and checkpoint.is_file():
        pointer = checkpoint
        try:
            checkpoint = pointed_checkpoint(pointer)
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(pointer, f"is not a readable checkpoints/last pointer ({err})") from None
        if not checkpoint.is_file():
            raise InputError(pointer, f"points to {checkpoint.name}, which does not exist")
    ckpt = load_training_checkpoint(checkpoint)
    build = generator_from_checkpoint if ckpt.get("task") == "generator" else model_from_checkpoint
    model = build(ckpt, ema=ema, source=checkpoint)
    if output.exists() and not output.is_dir():
        raise InputError(output, "exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        model.save_pretrained(output)  # each file is written to a temporary name, then renamed
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700 folders; give the usual permissions
        model.save_pretrained(tmp)
        if output.is_dir():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def run(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.output, ema=not args.raw)
    print(f"wrote {out}")
    return 0
