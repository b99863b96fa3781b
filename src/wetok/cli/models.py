"""The one resolver of ``--model`` strings: what every command means by a model.

In order: a ``wetok train`` checkpoint (``.pt``, a ``checkpoints/last`` pointer), an official ``.ckpt`` (with
``--config``), a native model folder, a registered name (``wetok info`` lists them; ``official:<name>`` is
accepted for the official ones), else a Hugging Face Hub repo id. A registered name loads its trained weights; a
randomly initialised model needs ``random_init=True`` (``--random-init``) and is announced on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import CONFIG_NAME, load_folder, load_pretrained, read_config
from ..config import WeTokConfig
from ..errors import InputError
from ..model import WeTok
from ..official import load_official, official_config, read_official_config
from ..presets import is_preset
from ..registry import find_model, no_weights_message

__all__ = ["DEFAULT_MODEL", "FALLBACK_MODEL", "default_spec", "load_model", "random_init_note", "spec_config"]

#: The name of the bundled model, used when --model is not given.
DEFAULT_MODEL = "default"
#: Used (randomly initialised) when --model is not given and the package has no bundled model.
FALLBACK_MODEL = "tiny-f8"
#: Seed of every randomly initialised model, so that e.g. ``encode`` then ``decode`` use the same weights.
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class Spec:
    """A classified --model string."""

    kind: str  # "training", "official", "folder", "registry", "hub"
    value: str


def default_spec() -> str | None:
    """The bundled model's name, or None when this installation has none."""
    return DEFAULT_MODEL if find_model(DEFAULT_MODEL) is not None else None


def classify(spec: str) -> Spec:
    path = Path(spec)
    if spec.endswith(".pt") or path.name == "last" and path.is_file():
        return Spec("training", spec)  # a missing .pt file is reported as such when it is read
    if spec.endswith(".ckpt"):
        return Spec("official", spec)
    if path.is_dir():
        is_run = (path / "checkpoints").is_dir() and not (path / CONFIG_NAME).is_file()
        return Spec("training" if is_run else "folder", spec)
    if find_model(spec) is not None:
        return Spec("registry", spec)
    return Spec("hub", spec)


def random_init_note(spec: str) -> str:
    """The one stderr line of a command that runs a randomly initialised model."""
    return (f"note: {spec} is randomly initialised (seed {RANDOM_INIT_SEED}, --random-init), "
            "so its outputs are not meaningful")


def load_model(
    spec: str,
    config: str | Path | None = None,
    *,
    random_init: bool = False,
    ema: bool = True,
    progress: bool = True,
) -> WeTok:
    """The model a --model string names, in eval mode on the CPU (see the module docstring for the forms).

    ``config`` is the official YAML (or a preset name) an official ``.ckpt`` needs. ``random_init`` builds a
    registered configuration with random weights, seeded (without touching the global RNG) so that two runs
    give the same model. ``ema`` picks EMA weights of training and official checkpoints.
    """
    kind = classify(spec)
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = WeTok(spec_config(spec, config)).eval()
        model.name_or_path = spec
        return model
    if kind.kind == "training":
        from ..train.checkpoints import load_checkpoint_model

        return load_checkpoint_model(spec, ema=ema)
    if kind.kind == "official":
        if config is None:
            raise InputError(spec, "an official .ckpt needs its YAML config (--config) or a preset name")
        model = load_official(spec, config, ema=ema)
        model.name_or_path = spec
        return model
    if kind.kind == "folder":
        model = load_folder(spec)
        model.name_or_path = spec
        return model
    if kind.kind == "registry":
        entry = find_model(spec)
        assert entry is not None
        if entry.family != "tokenizer":
            raise InputError(spec, f"is a {entry.family}, not a tokenizer")
        if entry.weights is None:
            raise InputError(spec, no_weights_message(entry))
    return load_pretrained(spec, progress=progress)


def spec_config(spec: str, config: str | Path | None = None) -> WeTokConfig:
    """The :class:`WeTokConfig` of a --model string, without reading weights where that is possible."""
    kind = classify(spec)
    if kind.kind == "registry":
        entry = find_model(spec)
        assert entry is not None
        if entry.family != "tokenizer":
            raise InputError(spec, f"is a {entry.family}, not a tokenizer")
        return entry.config
    if kind.kind == "folder" and (Path(spec) / CONFIG_NAME).is_file():
        return read_config(Path(spec) / CONFIG_NAME)
    if kind.kind == "official" and config is not None:
        return official_config(str(config)) if is_preset(str(config)) else read_official_config(config)
    return load_model(spec, config).config
