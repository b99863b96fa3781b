"""Reading weights safely: torch checkpoints without pickled code, and state dicts checked against the model
(names and shapes, from file headers where the format has them) before tensors are read or modules allocated.
Every failure is one line: the file, then the reason (never torch's advice to load with ``weights_only=False``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, InputError, first_line

__all__ = ["check_state", "expected_shapes", "read_torch_file", "safetensors_shapes"]

Shape = tuple[int, ...]


def expected_shapes(build: Callable[[Any], nn.Module], config: Any) -> dict[str, Shape]:
    """The state-dict shapes of ``build(config)``, built on the meta device (no memory for the weights)."""
    with torch.device("meta"):
        module = build(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _printable(key: object) -> str:
    """A name read from a file, safe to print on one line: non-printable characters escaped, at most 100."""
    text = str(key)
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 100 else text[:97] + "..."


def _names(keys: list[str]) -> str:
    return ", ".join(map(_printable, keys[:3])) + (", ..." if len(keys) > 3 else "")


def check_state(expected: Mapping[str, Shape], given: Mapping[str, Any], source: object) -> None:
    """Raise one :class:`CheckpointError` line when ``given`` (tensors, or shapes read from a header) does not
    have exactly the names and shapes of ``expected``: what is missing, unexpected, or of the wrong shape (how
    many, and the first ones)."""
    shapes: dict[str, Shape] = {}
    for key, value in given.items():
        if isinstance(value, Tensor):
            shapes[key] = tuple(value.shape)
        elif isinstance(value, tuple):
            shapes[key] = value
        else:
            raise CheckpointError(f"{source}: entry {_printable(key)!r} is a {type(value).__name__}, not a tensor")
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected), key=str)
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_names(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected ({_names(unexpected)})"] if unexpected else [])
        raise CheckpointError(f"{source}: the weights do not match the model: {'; '.join(parts)}")
    wrong = [k for k in expected if shapes[k] != tuple(expected[k])]
    if wrong:
        first = wrong[0]
        raise CheckpointError(
            f"{source}: {len(wrong)} tensor{'s have' if len(wrong) > 1 else ' has'} the wrong shape for the model, "
            f"first: {_printable(first)} expected {list(expected[first])} got {list(shapes[first])}"
        )


def safetensors_shapes(path: str | Path) -> dict[str, Shape]:
    """Tensor names and shapes from a ``.safetensors`` header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise InputError(path, f"cannot read weights: {first_line(err)}") from err




def read_torch_file(path: str | Path, what: str, *, mmap: bool = True) -> Any:
    """``torch.load`` of a checkpoint of tensors and plain values (``weights_only=True``, never code), or one
    :class:`InputError`. Only torch's zip format is read: the legacy format allocates what its header claims
    before reading it. ``mmap`` maps tensors from the file instead of reading them into memory."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise InputError(path, f"cannot read {what}: {err.strerror or err}") from err
    if not is_zip:
        raise InputError(path, f"cannot read {what}: not a torch checkpoint (torch.save zip format)")
    try:  # torch.save stores its records uncompressed: a compressed one could inflate to any size
        with zipfile.ZipFile(path) as archive:
            packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise InputError(path, f"cannot read {what}: {first_line(err)}") from err
    if packed:
        raise InputError(path, f"cannot read {what}: compressed records ({_printable(packed[0])}) are not "
                               "written by torch.save and are refused")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated or foreign files raise various pickle / zip / runtime errors
        reason = first_line(err)
        if reason.startswith("Weights only load failed") or "weights_only" in reason:
            reason = "it holds objects other than tensors and plain values (refused), or is corrupt"
        raise InputError(path, f"cannot read {what}: {reason}") from err
