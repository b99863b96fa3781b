"""Native weights: ``config.json`` + ``model.safetensors`` (diffusers-style), from a folder, the Hugging Face Hub or
a registered name (:mod:`wetok.registry`). Official checkpoints are converted by :mod:`wetok.official`; the
checkpoints of ``wetok train`` are read by :mod:`wetok.train.checkpoints`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._files import atomic_write, read_limited
from ._hub import hub_file, hub_snapshot
from ._state import check_state, expected_shapes, safetensors_shapes
from .config import WeTokConfig
from .errors import InputError
from .model import WeTok
from .official import MAX_CONFIG_BYTES, load_official
from .registry import DEFAULT_MODEL_DIR, ModelEntry, find_model, no_weights_message

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_MODEL_DIR",
    "WEIGHTS_NAME",
    "describe",
    "load_entry",
    "load_folder",
    "load_pretrained",
    "read_config",
    "read_weights",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- native format
def save_pretrained(model: WeTok, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each written to a temporary file, then renamed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {"wetok_format_version": FORMAT_VERSION, **model.config.to_dict()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def read_config_json(path: str | Path) -> dict:
    """The fields of a native ``config.json`` (a tokenizer's or a generator's): a JSON object of a format this
    wetok reads, its ``wetok_format_version`` removed."""
    path = Path(path)
    try:
        data = json.loads(read_limited(path, MAX_CONFIG_BYTES, "config").decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise InputError(path, f"cannot read config: {err}") from err
    if not isinstance(data, dict):
        raise InputError(path, "not a JSON object")
    version = data.pop("wetok_format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(path, f"written by a newer wetok or another program (format {version!r}); upgrade wetok")
    return data


def read_config(path: str | Path) -> WeTokConfig:
    """Read a native ``config.json``."""
    path = Path(path)
    data = read_config_json(path)
    try:
        return WeTokConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise InputError(path, f"invalid config: {err}") from err


def load_pretrained(
    name_or_path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> WeTok:
    """The trained model of a native folder, a registered name or a Hugging Face Hub repo id (in that order).

    A registered name (:func:`wetok.list_models`) loads its weights: the bundled folder, or the Hub file
    downloaded through ``huggingface_hub`` (cached; a cached file needs no network; ``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True`` uses the cache only; without a network the download fails within seconds, in one
    :class:`InputError`). A name without published weights is an :class:`InputError` that says so.
    """
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, progress=progress)
    path = Path(name_or_path)
    if path.is_dir():
        model = load_folder(path)
    elif (entry := find_model(str(name_or_path))) is not None:
        if entry.family != "tokenizer":
            raise InputError(name_or_path, f"is a {entry.family}, not a tokenizer")
        model = load_entry(entry, **hub)
    else:
        model = load_folder(_download_from_hub(str(name_or_path), **hub))
    model.name_or_path = str(name_or_path)
    return model.to(device=device, dtype=dtype) if (device or dtype) else model


def load_entry(entry: ModelEntry, *, revision: str | None = None, cache_dir: str | Path | None = None,
               local_files_only: bool = False, progress: bool = True) -> WeTok:
    """The trained weights of a registered tokenizer entry (bundled folder, native Hub repo or official file)."""
    weights = entry.weights
    if weights is None:
        raise InputError(entry.name, no_weights_message(entry))
    if weights.source == "bundled":
        model = load_folder(Path(weights.location))
    elif weights.format == "official":
        path = hub_file(weights.location, weights.filename or "", revision=revision or weights.revision,
                        cache_dir=cache_dir, local_files_only=local_files_only, progress=progress)
        model = load_official(path, entry.config)
    else:
        model = load_folder(_download_from_hub(weights.location, revision or weights.revision, cache_dir,
                                               local_files_only, progress))
    model.name_or_path = entry.name
    return model


def load_folder(path: str | Path) -> WeTok:
    """The model of a native folder (``config.json`` + ``model.safetensors``), in eval mode. The weights' names
    and shapes are checked against the config (from the file's header) before any tensor is read."""
    path = Path(path)
    config = read_config(path / CONFIG_NAME)
    weights = path / WEIGHTS_NAME
    state = read_weights(weights, WeTok, config)
    model = WeTok(config)
    model.load_state_dict(state)
    return model.eval()


def read_weights(weights: str | Path, build: Callable[[Any], torch.nn.Module], config: Any) -> dict[str, Tensor]:
    """The tensors of a ``model.safetensors`` for ``build(config)``: its header checked against the model's
    state-dict names and shapes (computed without allocating the model) before the tensors are read; every
    failure is one :class:`InputError` / :class:`CheckpointError` naming the file."""
    weights = Path(weights)
    if not weights.is_file():
        raise InputError(weights, "missing weights file")
    check_state(expected_shapes(build, config), safetensors_shapes(weights), weights)
    try:
        return load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise InputError(weights, f"cannot read weights: {str(err).strip().splitlines()[0][:300]}") from err


def _download_from_hub(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                       local_files_only: bool = False, progress: bool = True) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise InputError(repo_id, "not a model folder, a registered model name or a Hugging Face Hub repo id "
                                  "(owner/name); `wetok info` lists the registered names")
    return hub_snapshot(repo_id, [CONFIG_NAME, WEIGHTS_NAME], revision=revision, cache_dir=cache_dir,
                        local_files_only=local_files_only, progress=progress)


def _load_exact(model: torch.nn.Module, state: dict[str, Tensor], source: object) -> None:
    """Load ``state`` into ``model``: exactly its names and shapes, else one :class:`CheckpointError` line."""
    check_state({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, source)
    model.load_state_dict(state)


def describe(model: WeTok) -> dict[str, Any]:
    """A JSON-able summary of a model (``wetok info``)."""
    cfg = model.config
    f = cfg.downsample_factor
    return {
        "name": cfg.name,
        "model_id": model.model_id,
        "weights_id": None if next(model.parameters()).is_meta else model.weights_id,
        "config": cfg.to_dict(),
        "parameters": model.num_parameters(),
        "downsample_factor": f,
        "bits_per_token": cfg.bits_per_token,
        "tokens_per_256px_image": (256 // f) ** 2 * cfg.groups,
        "compression_ratio_256px": cfg.compression_ratio(256, 256),
        "bits_per_pixel": cfg.bits_per_token / f**2,
    }
