"""Official WeTok checkpoints: the Lightning ``.ckpt`` + YAML config of the official code, and the released files
on the Hugging Face Hub (``GrayShine/WeTok``).

Official checkpoints keep raw weights under their module names (``encoder.*``, ``decoder.*``), the loss modules
under ``loss.*`` (LPIPS, discriminator) and an EMA copy under ``model_ema.<name with the dots removed>``. Our
module names are the official ones, so the mapping is the identity except for the decoder's upsampler convs,
whose output channels are permuted from the official DCR depth-to-space order to ``pixel_shuffle`` order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ._files import read_limited
from ._hub import hub_file
from ._state import check_state, expected_shapes, read_torch_file
from ._validate import check_int
from .blocks import dcr_to_pixel_shuffle, pixel_shuffle_to_dcr
from .config import WeTokConfig
from .errors import CheckpointError, InputError
from .model import WeTok
from .presets import OFFICIAL_HUB_FILES, OFFICIAL_HUB_REPO, canonical_name, get_config, is_preset

__all__ = [
    "LoadReport",
    "download_official",
    "load_official",
    "load_official_with_report",
    "official_config",
    "read_official_config",
    "to_official_state_dict",
]

logger = logging.getLogger("wetok")

_SKIPPED_MARKERS = ("inception_model", "lpips_vgg", "lpips_alex")


def read_official_config(path: str | Path) -> WeTokConfig:
    """Parse the model section of an official YAML config (LightningCLI ``init_args`` or older ``params``)."""
    path = Path(path)
    data = read_yaml(path, "YAML config")
    try:
        model = data["model"]
        args = model.get("init_args", model.get("params"))
        dd = args["ddconfig"]
        n_embed = check_int("n_embed", args["n_embed"], 2, 2**62)
        groups = check_int("num_codebooks", args.get("num_codebooks", 1), 1)
        z_channels = check_int("z_channels", dd["z_channels"], 1)
        if check_int("embed_dim", args.get("embed_dim", z_channels), 1) != z_channels:
            raise InputError(path, "embed_dim differs from z_channels; such models were never released")
        bits = n_embed.bit_length() - 1
        if 2**bits != n_embed:
            raise InputError(path, f"n_embed {n_embed} is not a power of two")
        generative = args.get("gan_decoder", dd.get("gan_decoder", False))
        return WeTokConfig(
            channels=dd["ch"],
            ch_mult=dd["ch_mult"],
            num_res_blocks=dd["num_res_blocks"],
            z_channels=z_channels,
            groups=groups,
            bits_per_group=bits,
            generative_decoder=generative,
            codebook_form="pooled",
            token_reduction="mean",
            name=path.stem,
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise InputError(path, f"not an official WeTok model config ({type(err).__name__}: {err})") from err
    except ValueError as err:
        raise InputError(path, f"invalid model config: {err}") from err


#: Configuration files (YAML recipes and configs) larger than this are refused before they are parsed.
MAX_CONFIG_BYTES = 10 * 2**20


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """A YAML file parsed with ``yaml.safe_load`` (at most :data:`MAX_CONFIG_BYTES`), or one InputError."""
    path = Path(path)
    try:
        return yaml.safe_load(read_limited(path, MAX_CONFIG_BYTES, what).decode("utf-8"))
    except OSError as err:
        raise InputError(path, f"cannot read {what}: {err.strerror or err}") from err
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise InputError(path, f"invalid {what}: {reason}") from err


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
) -> WeTok:
    """Load an official Lightning ``.ckpt`` with its YAML config, a preset name or a :class:`WeTokConfig`.

    See :func:`load_official_with_report` for the rules; this returns only the model.
    """
    return load_official_with_report(ckpt, config, ema=ema, device=device)[0]


def load_official_with_report(
    ckpt: str | Path,
    config: str | Path | WeTokConfig,
    *,
    ema: bool = True,
    device: torch.device | str | None = None,
) -> tuple[WeTok, LoadReport]:
    """Load an official ``.ckpt`` (like :func:`load_official`) and report where each tensor came from.

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
    expected = expected_shapes(WeTok, cfg)
    report = LoadReport(weights="ema" if ema else "raw")
    consumed: set[str] = set()
    new_state: dict[str, Tensor] = {}
    missing: list[str] = []
    for key in expected:
        ema_key = "model_ema." + key.replace(".", "")
        if ema and ema_key in state:
            new_state[key] = state[ema_key]
            report.loaded_from_ema.append(key)
            consumed.add(ema_key)
        elif key in state:
            new_state[key] = state[key]
            report.loaded_from_raw.append(key)
        else:
            missing.append(key)
            continue
        consumed.add(key)
    unexpected = []
    for key in state:
        if key in consumed:
            continue
        if _is_skippable(key):
            report.skipped.append(key)
        else:
            unexpected.append(key)
    check_state({k: expected[k] for k in new_state}, new_state, ckpt)  # another architecture: say so first
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: does not match config {cfg.name or ''}: {len(missing)} missing model keys {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, {len(unexpected)} unexpected keys {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}"
        )
    model = WeTok(cfg)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    new_state = {k: _official_tensor(k, v.to(dtypes[k])) for k, v in new_state.items()}
    model.load_state_dict(new_state)
    model.eval()
    logger.info("%s: %s", ckpt, report.summary())
    if device is not None:
        model.to(device)
    return model, report


def _is_skippable(key: str) -> bool:
    if key.startswith("loss.") or any(m in key for m in _SKIPPED_MARKERS):
        return True
    # EMA buffers not taken: decay / num_updates, the discriminator's, and the model's own when raw weights
    # were asked for (or EMA entries for modules this model does not have, e.g. a stage-1 encoder EMA).
    return key.startswith("model_ema.")


def official_config(name: str) -> WeTokConfig:
    """The preset ``name`` with the official quantizer options (pooled codebook entropy, mean token reduction)."""
    return get_config(name, codebook_form="pooled", token_reduction="mean")


def _resolve_config(config: str | Path | WeTokConfig) -> WeTokConfig:
    if isinstance(config, WeTokConfig):
        return config
    if isinstance(config, str) and is_preset(config) and not Path(config).is_file():
        return official_config(config)
    path = Path(config)
    if not path.is_file():
        raise InputError(path, "no such config file or preset name")
    return read_official_config(path)


def _read_official_state(ckpt: Path) -> dict[str, Tensor]:
    data = read_torch_file(ckpt, "checkpoint")
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise InputError(ckpt, "not a Lightning checkpoint with a 'state_dict' of tensors")
    return state


def download_official(name: str, *, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Fetch an official checkpoint (``GrayShine/WeTok``) through ``huggingface_hub`` and return its path.

    A cached file is used without the network; without a network this fails within seconds, in one
    :class:`InputError` that says what to do.
    """
    key = canonical_name(name)
    if key not in OFFICIAL_HUB_FILES:
        raise InputError(name, f"no official checkpoint of that name; known: {', '.join(OFFICIAL_HUB_FILES)}")
    return hub_file(OFFICIAL_HUB_REPO, OFFICIAL_HUB_FILES[key], cache_dir=cache_dir, progress=progress)
