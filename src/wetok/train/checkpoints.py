"""Reading what ``wetok train`` writes: the checkpoints of a run folder and the model inside one, and their export
to the native format (``wetok export``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .._files import atomic_folder
from .._state import check_state, expected_shapes, read_torch_file
from ..config import WeTokConfig
from ..errors import InputError
from ..model import WeTok

__all__ = [
    "CHECKPOINT_DIR",
    "LAST_POINTER",
    "export",
    "latest_checkpoint",
    "load_training_checkpoint",
    "model_from_checkpoint",
    "pointed_checkpoint",
    "resolve_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
LAST_POINTER = "last"


def pointed_checkpoint(pointer: str | Path) -> Path:
    """The checkpoint a ``checkpoints/last`` pointer names (a one-line text file holding a ``step-*.pt`` name in
    the same folder; the file may be gone)."""
    pointer = Path(pointer)
    with open(pointer, "rb") as file:
        name = file.read(256).decode("utf-8").strip()
    if not re.fullmatch(r"step-\d+\.pt", name):
        raise InputError(pointer, "is not a checkpoints/last pointer (one line naming a step-*.pt file beside it)")
    return pointer.parent / name


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory (the ``checkpoints/last`` pointer, else the highest step)."""
    folder = Path(output) / CHECKPOINT_DIR
    pointer = folder / LAST_POINTER
    if pointer.is_file():
        try:
            candidate = pointed_checkpoint(pointer)
        except (OSError, UnicodeDecodeError, InputError):
            candidate = None  # a damaged pointer: fall back on the highest step
        if candidate is not None and candidate.is_file():
            return candidate
    found = sorted(folder.glob("step-*.pt"))
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a ``step-*.pt`` file, a ``checkpoints/last`` pointer or a run folder (its last)."""
    path = Path(path)
    if path.is_dir():
        last = latest_checkpoint(path)
        if last is None:
            raise InputError(path, "holds no checkpoints/step-*.pt")
        return last
    if path.name == LAST_POINTER and path.is_file():
        try:
            checkpoint = pointed_checkpoint(path)
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(path, f"is not a readable checkpoints/last pointer ({err})") from None
        if not checkpoint.is_file():
            raise InputError(path, f"points to {checkpoint.name}, which does not exist")
        return checkpoint
    return path


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``wetok train`` (tensors and plain Python values only)."""
    ckpt = read_torch_file(path, "training checkpoint", mmap=False)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "ema" not in ckpt:
        raise InputError(path, "not a wetok training checkpoint (no model_config / ema entries)")
    return ckpt


def checkpoint_weights(ckpt: dict[str, Any], live_key: str, config_type: Any, build: Any, *, ema: bool,
                       source: object) -> tuple[Any, dict[str, Any]]:
    """The validated model config of a training checkpoint and the state dict to load (the EMA's, or the live
    ``live_key`` one), checked against the model's names and shapes before the model is built."""
    try:
        config = config_type.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as err:
        raise InputError(source, f"invalid model_config: {err}") from err
    use_ema = ema and ckpt.get("ema") is not None
    weights = ckpt["ema"] if use_ema else ckpt.get(live_key)
    if not isinstance(weights, dict):
        raise InputError(source, f"not a wetok training checkpoint (no {live_key} / ema weights)")
    if use_ema:
        weights = {k.removeprefix("module."): v for k, v in weights.items()
                   if isinstance(k, str) and k.startswith("module.")}
    check_state(expected_shapes(build, config), weights, f"{source} ({'EMA' if use_ema else live_key} weights)")
    return config, weights


def model_from_checkpoint(ckpt: dict[str, Any], *, ema: bool = True, source: object = "checkpoint") -> WeTok:
    """The EMA (default; the live weights when the run kept no EMA) or live tokenizer of a tokenizer training
    checkpoint, as a :class:`WeTok` in eval mode."""
    task = ckpt.get("task", "tokenizer")
    if task != "tokenizer":
        raise InputError(source, f"is a {str(task)[:40]!r} training checkpoint, not a tokenizer's")
    config, state = checkpoint_weights(ckpt, "generator", WeTokConfig, WeTok, ema=ema, source=source)
    model = WeTok(config)
    model.load_state_dict(state)
    model.name_or_path = str(source)
    return model.eval()


def load_checkpoint_model(path: str | Path, *, ema: bool = True) -> WeTok:
    """The model of a training checkpoint, a ``checkpoints/last`` pointer or a run folder (its last checkpoint)."""
    checkpoint = resolve_checkpoint(path)
    return model_from_checkpoint(load_training_checkpoint(checkpoint), ema=ema, source=checkpoint)


def export(checkpoint: str | Path, output: str | Path, *, ema: bool = True) -> Path:
    """Write the model of a training checkpoint (or of a run folder's last checkpoint) to ``output`` as a native
    model folder; a new folder appears whole (written under a temporary name, then renamed)."""
    from .generator import generator_from_checkpoint

    output = Path(output)
    checkpoint = resolve_checkpoint(checkpoint)
    ckpt = load_training_checkpoint(checkpoint)
    build = generator_from_checkpoint if ckpt.get("task") == "generator" else model_from_checkpoint
    model = build(ckpt, ema=ema, source=checkpoint)
    if output.exists() and not output.is_dir():
        raise InputError(output, "exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        model.save_pretrained(output)  # each file is written to a temporary name, then renamed
        return output
    return atomic_folder(output, model.save_pretrained)
