"""Named models: each name maps to a configuration and, where published, its trained weights (timm-style).

A name means trained weights: ``WeTok.from_pretrained("ImageNet_downsample16")`` downloads and loads the official
checkpoint, ``WeTok.from_pretrained("default")`` loads the model bundled in the package. Random initialisation
is asked for explicitly (``WeTok.from_preset(name)``, ``--random-init``). Entries without published weights
(the small CPU configurations) exist for training and tests.

Other model families register their own entries with :func:`register_model`, e.g. the generator::

    register_model(ModelEntry(name="my-generator", family="generator", config=cfg,
                              weights=Weights("hub", "owner/repo"), build=MyModel, load=my_loader))

``family`` separates tokenizers from generators in :func:`list_models`; ``build(config)`` makes a randomly
initialised model, ``load(entry, **kwargs)`` the trained one. A family living in a package listed in
``PLUGIN_MODULES`` registers itself when that package is imported, which the lookups here do on demand.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import WeTokConfig
from .errors import InputError
from .presets import OFFICIAL_HUB_FILES, OFFICIAL_HUB_REPO, PRESETS, canonical_name

__all__ = [
    "DEFAULT_MODEL_DIR",
    "FAMILIES",
    "ModelEntry",
    "Weights",
    "create_model",
    "find_model",
    "list_models",
    "model_entry",
    "register_model",
]

#: The model bundled in the package (``config.json`` + ``model.safetensors``), registered as ``default``.
DEFAULT_MODEL_DIR = Path(__file__).parent / "weights" / "default"
#: The tokenizer of the bundled CIFAR-10 generator (``wetok.generation``'s ``cifar10-ar``), stored in its folder.
CIFAR10_TOKENIZER_DIR = Path(__file__).parent / "weights" / "cifar10-ar" / "tokenizer"
FAMILIES = ("tokenizer", "generator")
#: Packages whose import registers further entries (imported by the lookups when they exist).
PLUGIN_MODULES = ("wetok.generation",)
#: Prefix accepted before a registered name (``official:ImageNet_downsample16``, kept from earlier releases).
OFFICIAL_PREFIX = "official:"


@dataclass(frozen=True)
class Weights:
    """Where an entry's trained weights are.

    ``source``: "bundled" (``location`` is a folder in the package) or "hub" (``location`` is a Hugging Face Hub
    repo id). ``filename``: the file in the repo for a single-file checkpoint, None for a native folder
    (``config.json`` + ``model.safetensors``). ``format``: "native" or "official" (a Lightning ``.ckpt`` of the
    official code, converted on load).
    """

    source: str
    location: str
    filename: str | None = None
    format: str = "native"
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.source not in ("bundled", "hub"):
            raise ValueError(f"weights source must be 'bundled' or 'hub', got {self.source!r}")
        if self.format not in ("native", "official"):
            raise ValueError(f"weights format must be 'native' or 'official', got {self.format!r}")

    def describe(self) -> str:
        where = f"{self.location}/{self.filename}" if self.filename else self.location
        return f"{self.source} ({where})" if self.source == "hub" else self.source


@dataclass(frozen=True)
class ModelEntry:
    """A registered name: its family, configuration, weights (None: configuration only) and how to build it."""

    name: str
    family: str
    config: Any
    weights: Weights | None = None
    description: str = ""
    aliases: tuple[str, ...] = ()
    build: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)
    load: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    @property
    def has_weights(self) -> bool:
        return self.weights is not None


_REGISTRY: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}
_plugins_loaded = False


def register_model(entry: ModelEntry, *, overwrite: bool = False) -> ModelEntry:
    """Add ``entry`` (and its aliases) to the registry; a name already taken is an error unless ``overwrite``."""
    if entry.family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {entry.family!r}")
    for name in (entry.name, *entry.aliases):
        owner = _ALIASES.get(name, name if name in _REGISTRY else None)
        if owner is not None and not overwrite:
            raise ValueError(f"model name {name!r} is already registered (by {owner!r})")
    _REGISTRY[entry.name] = entry
    for alias in entry.aliases:
        _ALIASES[alias] = entry.name
    return entry


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in PLUGIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def find_model(name: str) -> ModelEntry | None:
    """The entry registered as ``name`` (or an alias of it, or ``official:<name>``), else None."""
    key = name.removeprefix(OFFICIAL_PREFIX)
    for _ in range(2):
        key_c = canonical_name(key)
        found = _REGISTRY.get(_ALIASES.get(key_c, key_c))
        if found is not None:
            return found
        _load_plugins()
    return None


def model_entry(name: str, family: str | None = None) -> ModelEntry:
    """The entry of ``name``; an unknown name (or one of another family) is an :class:`InputError`."""
    entry = find_model(name)
    if entry is None or (family is not None and entry.family != family):
        known = ", ".join(e.name for e in list_models(family))
        raise InputError(name, f"no registered {family or 'model'} of that name; registered: {known}")
    return entry


def list_models(family: str | None = None, *, pretrained: bool | None = None) -> list[ModelEntry]:
    """Registered entries sorted by name; filtered by ``family`` and by having weights (``pretrained``)."""
    _load_plugins()
    return [e for _, e in sorted(_REGISTRY.items())
            if (family is None or e.family == family) and (pretrained is None or e.has_weights == pretrained)]


def create_model(name: str, *, pretrained: bool = True, **kwargs: Any) -> Any:
    """The model of a registered name: its trained weights (``pretrained=True``), else randomly initialised.

    Asking for the weights of an entry that has none is an :class:`InputError` that says so.
    """
    entry = model_entry(name)
    if not pretrained:
        if entry.build is None:
            raise InputError(name, "this entry cannot be built from its configuration")
        return entry.build(entry.config)
    if entry.weights is None or entry.load is None:
        raise InputError(name, no_weights_message(entry))
    return entry.load(entry, **kwargs)


def no_weights_message(entry: ModelEntry) -> str:
    """Why ``entry`` cannot be loaded with trained weights, and what to do instead."""
    hint = ""
    if entry.family == "tokenizer" and isinstance(entry.config, WeTokConfig):
        same = [e.name for e in list_models("tokenizer", pretrained=True)
                if isinstance(e.config, WeTokConfig) and e.config.identity() == entry.config.identity()]
        if same:
            hint = f", or the trained model of the same architecture: {', '.join(same)}"
    if entry.family == "generator":
        hint = "; official WeTok-AR checkpoints load from their .ckpt with --config (WeTokAR.from_official)"
    cls = "WeTokAR" if entry.family == "generator" else "WeTok"
    return ("has no published weights (a configuration only); ask for a randomly initialised model explicitly "
            f"(--random-init, {cls}.from_preset){hint}")


# ------------------------------------------------------------------------------------------- built-in tokenizers
def _build_tokenizer(config: WeTokConfig) -> Any:
    from .model import WeTok

    return WeTok(config)


def _load_tokenizer(entry: ModelEntry, **kwargs: Any) -> Any:
    from .checkpoints import load_entry

    return load_entry(entry, **kwargs)


def bundled_config(directory: Path = DEFAULT_MODEL_DIR) -> WeTokConfig | None:
    """The configuration of the bundled model, or None when this installation has none."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data.pop("wetok_format_version", None)
    return WeTokConfig.from_dict(data)


def _register_tokenizers() -> None:
    official = {"codebook_form": "pooled", "token_reduction": "mean"}  # the official quantizer options
    for name, config in PRESETS.items():
        weights = None
        description = "configuration only (for training and tests)"
        if name in OFFICIAL_HUB_FILES:
            config = config.replace(**official)
            weights = Weights("hub", OFFICIAL_HUB_REPO, OFFICIAL_HUB_FILES[name], format="official")
            description = "official WeTok release"
        register_model(ModelEntry(name, "tokenizer", config, weights, description,
                                  build=_build_tokenizer, load=_load_tokenizer))
    config = bundled_config()
    if config is not None:
        register_model(ModelEntry("default", "tokenizer", config, Weights("bundled", str(DEFAULT_MODEL_DIR)),
                                  f"bundled in the package ({config.name or 'custom'} architecture, CPU-trained)",
                                  build=_build_tokenizer, load=_load_tokenizer))
    config = bundled_config(CIFAR10_TOKENIZER_DIR)
    if config is not None:
        register_model(ModelEntry("cifar10-tokenizer", "tokenizer", config, Weights("bundled", str(CIFAR10_TOKENIZER_DIR)),
                                  "bundled in the package: the CIFAR-10 generator's tokenizer (32 x 32 images), "
                                  "CPU-trained (docs/cifar10-generator.md)",
                                  build=_build_tokenizer, load=_load_tokenizer))


_register_tokenizers()
