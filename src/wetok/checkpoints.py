"""Weights in and out: the native format (``config.json`` + ``model.safetensors``), the Hugging Face Hub, and
official WeTok Lightning checkpoints with their YAML configs.

Official checkpoints keep raw weights under their module names (``encoder.*``, ``decoder.*``), the loss modules
under ``loss.*`` (LPIPS, discriminator) and an EMA copy under ``model_ema.<name with the dots removed>``. Our
module names are the official ones, so the mapping is the identity except for the decoder's upsampler convs,
whose output channels are permuted from the official DCR depth-to-space order to ``pixel_shuffle`` order.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._files import atomic_write
from .blocks import dcr_to_pixel_shuffle, pixel_shuffle_to_dcr
from .config import WeTokConfig
from .errors import CheckpointError, InputError
from .model import WeTok
from .presets import OFFICIAL_HUB_FILES, OFFICIAL_HUB_REPO, canonical_name, get_config, is_preset

logger = logging.getLogger("wetok")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_SKIPPED_MARKERS = ("inception_model", "lpips_vgg", "lpips_alex")


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


def read_config(path: str | Path) -> WeTokConfig:
    """Read a native ``config.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read config: {err}") from err
    version = data.pop("wetok_format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise InputError(path, f"written by a newer wetok (format {version}); upgrade wetok")
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
) -> WeTok:
    """Load a native model from a local directory or a Hugging Face Hub repo id.

    Hub downloads go through ``huggingface_hub`` (cached under its cache directory; ``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True`` uses the cache only).
    """
    path = Path(name_or_path)
    if not path.is_dir():
        path = _download_from_hub(str(name_or_path), revision, cache_dir, local_files_only)
    config = read_config(path / CONFIG_NAME)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(weights, "missing weights file")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise InputError(weights, f"cannot read weights: {err}") from err
    model = WeTok(config)
    _load_exact(model, state, weights)
    model.eval()
    return model.to(device=device, dtype=dtype) if (device or dtype) else model


def _download_from_hub(repo_id: str, revision: str | None, cache_dir: str | Path | None, local_only: bool) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise InputError(repo_id, "not a directory, a preset name or a Hugging Face Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            local_files_only=local_only,
        )
    except Exception as err:  # network, auth, offline-mode and missing-repo errors all end here
        raise InputError(repo_id, f"cannot fetch from the Hugging Face Hub: {err}") from err
    return Path(local)


def _load_exact(model: WeTok, state: dict[str, Tensor], source: object) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: state dict does not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, the config needs {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state)


# -------------------------------------------------------------------------------------------- official checkpoints
def read_official_config(path: str | Path) -> WeTokConfig:
    """Parse the model section of an official YAML config (LightningCLI ``init_args`` or older ``params``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InputError(path, f"cannot read YAML config: {err}") from err
    try:
        model = data["model"]
        args = model.get("init_args", model.get("params"))
        dd = args["ddconfig"]
        n_embed = int(args["n_embed"])
        groups = int(args.get("num_codebooks", 1))
    except (KeyError, TypeError, AttributeError) as err:
        raise InputError(path, f"not an official WeTok model config (missing {err})") from err
    bits = int(round(math.log2(n_embed)))
    if 2**bits != n_embed:
        raise InputError(path, f"n_embed {n_embed} is not a power of two")
    if int(args.get("embed_dim", dd["z_channels"])) != int(dd["z_channels"]):
        raise InputError(path, "embed_dim differs from z_channels; such models were never released")
    generative = bool(args.get("gan_decoder", dd.get("gan_decoder", False)))
    try:
        return WeTokConfig(
            channels=int(dd["ch"]),
            ch_mult=tuple(dd["ch_mult"]),
            num_res_blocks=int(dd["num_res_blocks"]),
            z_channels=int(dd["z_channels"]),
            groups=groups,
            bits_per_group=bits,
            generative_decoder=generative,
            codebook_form="pooled",
            token_reduction="mean",
            name=path.stem,
        )
    except ValueError as err:
        raise InputError(path, f"invalid model config: {err}") from err


@dataclass
class LoadReport:
    """What :func:`load_official` did with each checkpoint key."""

    weights: str  # "ema" or "raw"
    loaded_from_ema: list[str] = field(default_factory=list)
    loaded_from_raw: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        groups: dict[str, int] = {}
        for key in self.skipped:
            prefix = ".".join(key.split(".")[:2])
            groups[prefix] = groups.get(prefix, 0) + 1
        skipped = ", ".join(f"{k}* ({n})" for k, n in sorted(groups.items())) or "none"
        return (
            f"{len(self.loaded_from_ema)} tensors from EMA, {len(self.loaded_from_raw)} raw; skipped: {skipped}"
        )


def _official_tensor(key: str, value: Tensor) -> Tensor:
    return dcr_to_pixel_shuffle(value) if ".upsample.conv1." in key else value


def to_official_state_dict(model: WeTok) -> dict[str, Tensor]:
    """Our weights under official names and layout (the inverse of the load mapping), e.g. for the official code."""
    return {
        k: (pixel_shuffle_to_dcr(v) if ".upsample.conv1." in k else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def load_official(
    ckpt: str | Path,
    config: str | Path | WeTokConfig,
    *,
    ema: bool = True,
    device: torch.device | str | None = None,
    output_loading_info: bool = False,
) -> WeTok | tuple[WeTok, LoadReport]:
    """Load an official Lightning ``.ckpt`` with its YAML config, a preset name or a :class:`WeTokConfig`.

    ``ema=True`` (the default, what the official evaluation uses) takes ``model_ema.<name without dots>`` where
    present and the raw weight otherwise (stage-2 checkpoints have no EMA encoder); ``ema=False`` takes the raw
    weights. Loss, discriminator and LPIPS keys are skipped and reported; a missing or unexpected model key is an
    error. The decoder kind (deterministic or generative) follows the checkpoint's ``decoder.conv_in``.
    """
    ckpt = Path(ckpt)
    cfg = _resolve_config(config)
    state = _read_official_state(ckpt)
    conv_in = state.get("decoder.conv_in.weight")
    if conv_in is not None and conv_in.dim() == 4:
        generative = conv_in.shape[1] == 2 * cfg.z_channels
        if generative != cfg.generative_decoder:
            logger.info("%s: decoder.conv_in takes %d channels; using generative_decoder=%s",
                        ckpt, conv_in.shape[1], generative)
            cfg = cfg.replace(generative_decoder=generative)
    model = WeTok(cfg)
    expected = model.state_dict()
    report = LoadReport(weights="ema" if ema else "raw")
    consumed: set[str] = set()
    new_state: dict[str, Tensor] = {}
    missing: list[str] = []
    for key in expected:
        ema_key = "model_ema." + key.replace(".", "")
        if ema and ema_key in state:
            value, source = state[ema_key], report.loaded_from_ema
            consumed.add(ema_key)
        elif key in state:
            value, source = state[key], report.loaded_from_raw
        else:
            missing.append(key)
            continue
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{ckpt}: {key} has shape {tuple(value.shape)}, the config needs "
                                  f"{tuple(expected[key].shape)}")
        new_state[key] = _official_tensor(key, value.to(expected[key].dtype))
        source.append(key)
        consumed.add(key)
    unexpected = []
    for key in state:
        if key in consumed:
            continue
        if _is_skippable(key):
            report.skipped.append(key)
        else:
            unexpected.append(key)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: does not match config {cfg.name or ''}: missing model keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    model.load_state_dict(new_state)
    model.eval()
    logger.info("%s: %s", ckpt, report.summary())
    if device is not None:
        model.to(device)
    return (model, report) if output_loading_info else model


def _is_skippable(key: str) -> bool:
    if key.startswith("loss.") or any(m in key for m in _SKIPPED_MARKERS):
        return True
    # EMA buffers not taken: decay / num_updates, the discriminator's, and the model's own when raw weights
    # were asked for (or EMA entries for modules this model does not have, e.g. a stage-1 encoder EMA).
    return key.startswith("model_ema.")


def _resolve_config(config: str | Path | WeTokConfig) -> WeTokConfig:
    if isinstance(config, WeTokConfig):
        return config
    if isinstance(config, str) and is_preset(config) and not Path(config).is_file():
        return get_config(config, codebook_form="pooled", token_reduction="mean")
    path = Path(config)
    if not path.is_file():
        raise InputError(path, "no such config file or preset name")
    return read_official_config(path)


def _read_official_state(ckpt: Path) -> dict[str, Tensor]:
    if not ckpt.is_file():
        raise InputError(ckpt, "no such checkpoint file")
    try:
        try:
            data = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            data = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise InputError(ckpt, f"cannot read checkpoint: {err}") from err
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(ckpt, "not a Lightning checkpoint with a 'state_dict' of tensors")
    return state


def download_official(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """Fetch an official checkpoint (``GrayShine/WeTok``) through ``huggingface_hub`` and return its path."""
    key = canonical_name(name)
    if key not in OFFICIAL_HUB_FILES:
        raise InputError(name, f"no official checkpoint of that name; known: {', '.join(OFFICIAL_HUB_FILES)}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(OFFICIAL_HUB_REPO, OFFICIAL_HUB_FILES[key], cache_dir=cache_dir))
    except Exception as err:
        raise InputError(f"{OFFICIAL_HUB_REPO}/{OFFICIAL_HUB_FILES[key]}", f"download failed: {err}") from err


# ----------------------------------------------------------------------------------------------- one entry point
DEFAULT_MODEL_DIR = Path(__file__).parent / "weights" / "default"


def load_model(
    spec: str | Path | None = None,
    config: str | Path | None = None,
    *,
    device: torch.device | str | None = None,
    ema: bool = True,
) -> WeTok:
    """Resolve what a user passes as ``--model``.

    ``None`` or ``"default"``: the model bundled in the package. ``official:<name>``: download an official
    checkpoint. A ``.pt`` file: a ``wetok train`` checkpoint (its EMA weights). A ``.ckpt`` file: an official
    checkpoint; ``config`` (its YAML or a preset name) is required. A directory: the native format. A preset name: a randomly
    initialised model of that configuration. Anything else of the form ``owner/name``: a Hub repo id.
    """
    spec = "default" if spec is None else str(spec)
    if spec == "default":
        if not (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file():
            raise InputError(DEFAULT_MODEL_DIR, "no bundled default model in this installation; pass --model")
        model = load_pretrained(DEFAULT_MODEL_DIR)
    elif spec.startswith("official:"):
        name = spec.split(":", 1)[1]
        model = load_official(download_official(name), config or name, ema=ema)
    elif spec.endswith(".pt") and Path(spec).is_file():
        from .train.module import load_training_checkpoint, model_from_checkpoint

        model = model_from_checkpoint(load_training_checkpoint(Path(spec)), ema=ema, source=spec)
    elif spec.endswith(".ckpt"):
        if config is None:
            raise InputError(spec, "an official .ckpt needs its YAML config (--config) or a preset name")
        model = load_official(spec, config, ema=ema)
    elif Path(spec).is_dir():
        model = load_pretrained(spec)
    elif is_preset(spec):
        model = WeTok.from_preset(spec).eval()
    else:
        model = load_pretrained(spec)
    return model.to(device) if device is not None else model


def describe(model: WeTok) -> dict[str, Any]:
    """A JSON-able summary of a model (``wetok info``)."""
    cfg = model.config
    f = cfg.downsample_factor
    return {
        "name": cfg.name,
        "model_id": model.model_id,
        "config": cfg.to_dict(),
        "parameters": model.num_parameters(),
        "downsample_factor": f,
        "bits_per_token": cfg.bits_per_token,
        "tokens_per_256px_image": (256 // f) ** 2 * cfg.groups,
        "compression_ratio_256px": cfg.compression_ratio(256, 256),
        "bits_per_pixel": cfg.bits_per_token / f**2,
    }
