"""The native format of a generator: ``config.json`` + ``model.safetensors``, and optionally the paired tokenizer
in the subfolder ``tokenizer/`` (itself a native WeTok folder). Local folders or Hugging Face Hub repo ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .._files import atomic_write
from ..checkpoints import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, _load_exact
from ..errors import InputError
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
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read config: {err}") from err
    if not isinstance(data, dict):
        raise InputError(path, "not a JSON object")
    version = data.pop("wetok_format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise InputError(path, f"written by a newer wetok (format {version}); upgrade wetok")
    model_type = data.pop("model_type", None)
    if model_type != MODEL_TYPE:
        raise InputError(path, "not a WeTok-AR generator config (a tokenizer's config.json?)")
    try:
        return WeTokARConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise InputError(path, f"invalid generator config: {err}") from err


def load_pretrained_ar(
    name_or_path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> WeTokAR:
    """Load a generator from a local folder or a Hub repo id; ``tokenizer/`` is loaded into ``.tokenizer``
    when present and ``tokenizer`` is true (it keeps float32 and follows ``device``)."""
    from .model import WeTokAR

    path = Path(name_or_path)
    if not path.is_dir():
        path = _download(str(name_or_path), revision, cache_dir, local_files_only)
    config = read_ar_config(path / CONFIG_NAME)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(weights, "missing weights file")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise InputError(weights, f"cannot read weights: {err}") from err
    model = WeTokAR(config)
    _load_exact(model, state, weights)  # type: ignore[arg-type]
    model.eval()
    if tokenizer and (path / TOKENIZER_FOLDER / CONFIG_NAME).is_file():
        from ..checkpoints import load_pretrained

        model.tokenizer = load_pretrained(path / TOKENIZER_FOLDER, device=device)
    return model.to(device=device, dtype=dtype) if (device or dtype) else model


def _download(repo_id: str, revision: str | None, cache_dir: str | Path | None, local_only: bool) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise InputError(repo_id, "not a directory, a preset name or a Hugging Face Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_only,
                                  allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, f"{TOKENIZER_FOLDER}/*"])
    except Exception as err:  # network, auth, offline-mode and missing-repo errors all end here
        raise InputError(repo_id, f"cannot fetch from the Hugging Face Hub: {err}") from err
    return Path(local)
