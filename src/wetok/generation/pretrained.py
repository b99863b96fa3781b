"""The native format of a generator: ``config.json`` + ``model.safetensors``, and optionally the paired tokenizer
in the subfolder ``tokenizer/`` (itself a native WeTok folder). Local folders or Hugging Face Hub repo ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .._files import atomic_write
from .._hub import hub_snapshot
from ..checkpoints import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    _load_exact,
    load_folder,
    read_config_json,
)
from ..errors import InputError, first_line
from ..token_shards import shown
from .checks import check_state_shapes, check_state_values
from .config import WeTokARConfig

if TYPE_CHECKING:
    from .model import WeTokAR

#: ``model_type`` in a generator's config.json (a tokenizer's has none).
MODEL_TYPE = "wetok-ar"
TOKENIZER_FOLDER = "tokenizer"


def save_pretrained_ar(model: WeTokAR, directory: str | Path, *, tokenizer: bool = True) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each via a temporary file, then renamed), and the attached
    tokenizer into ``tokenizer/`` when ``tokenizer`` is true."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {"wetok_format_version": FORMAT_VERSION, "model_type": MODEL_TYPE, **model.config.to_dict()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    if tokenizer and model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory / TOKENIZER_FOLDER)
    return directory


def read_ar_config(path: str | Path) -> WeTokARConfig:
    """Read a generator's ``config.json``."""
    path = Path(path)
    data = read_config_json(path)
    model_type = data.pop("model_type", None)
    if model_type != MODEL_TYPE:
        raise InputError(path, "not a WeTok-AR generator config (a tokenizer's config.json?)")
    try:
        config = WeTokARConfig.from_dict(data)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise InputError(path, f"invalid generator config: {first_line(err)}") from err
    return config


def load_pretrained_ar(
    name_or_path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> WeTokAR:
    """Load a generator from a local folder or a Hub repo id; ``tokenizer/`` is loaded into ``.tokenizer``
    when present and ``tokenizer`` is true (it keeps float32 and follows ``device``). Downloads go through
    ``huggingface_hub`` (cached; without a network they fail within seconds, in one :class:`InputError`)."""
    from .model import WeTokAR

    path = Path(name_or_path)
    if not path.is_dir():
        path = _registered_or_download(str(name_or_path), revision, cache_dir, local_files_only, progress)
    config = read_ar_config(path / CONFIG_NAME)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(weights, "missing weights file")
    check_state_shapes(config, _header_shapes(weights), weights)  # before anything is allocated
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise InputError(weights, f"cannot read weights: {first_line(err)}") from err
    check_state_values(state, weights)
    model = WeTokAR(config)
    _load_exact(model, state, weights)  # type: ignore[arg-type]
    model.eval()
    if tokenizer and (path / TOKENIZER_FOLDER / CONFIG_NAME).is_file():
        model.tokenizer = load_folder(path / TOKENIZER_FOLDER)
        model.tokenizer.name_or_path = f"{name_or_path}/{TOKENIZER_FOLDER}"
        if device is not None:
            model.tokenizer.to(device)
    model.name_or_path = str(name_or_path)
    return model.to(device=device, dtype=dtype) if (device or dtype) else model


def _header_shapes(weights: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (checked by safetensors; no tensor is read)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types
        raise InputError(weights, f"cannot read weights: {first_line(err)}") from err




def _registered_or_download(name: str, revision: str | None, cache_dir: str | Path | None, local_only: bool,
                            progress: bool) -> Path:
    """The folder of a registered generator's weights (bundled, or a native Hub repo, downloaded), else of a Hub
    repo id."""
    from ..registry import find_model, no_weights_message

    entry = find_model(name)
    if entry is None:
        return _download(name, revision, cache_dir, local_only, progress)
    if entry.family != "generator":
        raise InputError(name, f"is a {entry.family}, not a generator")
    if entry.weights is None:
        raise InputError(name, no_weights_message(entry))
    if entry.weights.source == "bundled":
        return Path(entry.weights.location)
    return _download(entry.weights.location, revision or entry.weights.revision, cache_dir, local_only, progress)


def _download(repo_id: str, revision: str | None, cache_dir: str | Path | None, local_only: bool,
              progress: bool) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise InputError(shown(repo_id, 200), "not a model folder, a registered generator name or a Hugging Face "
                                              "Hub repo id (owner/name); `wetok info` lists the registered names")
    return hub_snapshot(repo_id, [CONFIG_NAME, WEIGHTS_NAME, f"{TOKENIZER_FOLDER}/*"], revision=revision,
                        cache_dir=cache_dir, local_files_only=local_only, progress=progress)


def load_generator(
    spec: str | Path,
    config: str | Path | None = None,
    *,
    random_init: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> WeTokAR:
    """Resolve what a user passes as a generator ``--model``.

    A ``.ckpt`` file: an official AR checkpoint, with ``config`` (its GenStage YAML or a generator preset name).
    A ``wetok train`` generator checkpoint (``.pt``, a ``checkpoints/last`` pointer or a run folder): its EMA
    weights, with the run's tokenizer attached when it still loads. A folder: the native format. A registered generator name: its trained weights, or with ``random_init`` a
    randomly initialised model of its configuration (seed 0, without touching the global RNG). Anything else of
    the form ``owner/name``: a Hub repo id.
    """
    from ..registry import find_model, no_weights_message
    from .model import WeTokAR

    spec = str(spec)
    path = Path(spec)
    run_folder = path.is_dir() and (path / "checkpoints").is_dir() and not (path / CONFIG_NAME).is_file()
    if spec.endswith(".pt") or (path.name == "last" and path.is_file()) or run_folder:
        model = _from_training_checkpoint(spec)
        return model.to(device) if device is not None else model
    entry = None if spec.endswith(".ckpt") or path.is_dir() else find_model(spec)
    if entry is not None and entry.family != "generator":
        raise InputError(spec, f"is a {entry.family}, not a generator")
    if random_init:
        if entry is None:
            raise InputError(shown(spec, 200), "--random-init takes a registered generator name (`wetok info` lists them)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = WeTokAR(entry.config).eval()
    elif spec.endswith(".ckpt"):
        if config is None:
            raise InputError(shown(spec, 200), "an official .ckpt needs its GenStage YAML config (--config) or a preset name")
        from .official import load_official_ar

        model = load_official_ar(spec, config)
    elif entry is not None:
        if entry.weights is None or entry.load is None:
            raise InputError(spec, no_weights_message(entry))
        model = entry.load(entry, progress=progress)
    else:
        model = load_pretrained_ar(spec, progress=progress)
    model.name_or_path = spec
    return model.to(device) if device is not None else model


def _from_training_checkpoint(spec: str) -> WeTokAR:
    from ..train.checkpoints import load_training_checkpoint, resolve_checkpoint
    from ..train.generator import generator_from_checkpoint

    checkpoint = resolve_checkpoint(spec)
    ckpt = load_training_checkpoint(checkpoint)
    task = ckpt.get("task", "tokenizer")
    if task != "generator":
        raise InputError(checkpoint, f"is a {shown(task)} training checkpoint, not a generator's")
    _check_training_checkpoint(ckpt, checkpoint)
    model = generator_from_checkpoint(ckpt, source=checkpoint)
    model.name_or_path = str(checkpoint)
    return model


def _check_training_checkpoint(ckpt: dict, source: Path) -> None:
    """The config and the weights of a generator training checkpoint, checked before the model is built (the
    weights it loads: the EMA ones, or the live ones when the run kept no EMA)."""
    data = ckpt.get("model_config")
    if not isinstance(data, dict):
        raise InputError(source, "model_config is not a mapping of generator config fields")
    try:
        config = WeTokARConfig.from_dict(data)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise InputError(source, f"invalid generator config: {first_line(err)}") from err
    ema = ckpt.get("ema")
    state = ckpt.get("model") if ema is None else ema
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(source, f"{'ema' if ema is not None else 'model'} is not a mapping of names to tensors")
    if ema is not None:
        state = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
    check_state_shapes(config, {k: list(v.shape) for k, v in state.items()}, source)
    check_state_values(state, source)
