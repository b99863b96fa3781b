"""Training recipes: dataclasses, YAML loading and ``section.key=value`` overrides.

A recipe is a YAML file with the sections below (every key optional; defaults are the official stage-1 settings
of spec §4-5 except the model and data paths). ``trainer.task`` (or a top-level ``task:`` key) chooses what is
trained: ``tokenizer`` (WeTok, stages 1 and 2) or ``generator`` (WeTok-AR on token shards, spec §7.3); sections
``loss`` and ``discriminator`` are tokenizer-only, ``samples`` is generator-only. ``load_config("recipe.yaml", ["optim.lr=2e-4"])`` applies the
overrides after the file; override values are parsed as YAML (``1e-4`` is a float, ``null`` is None,
``[0.5,0.9]`` a list). Unknown keys are errors that name the file (or ``override``) and the key; every value is
checked against its field's declared type (a bool is not a number, ``abc`` is not an integer) and range before
anything is built or created.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .._validate import conform, describe_type
from ..config import WeTokConfig
from ..errors import InputError
from ..official import read_yaml
from ..presets import get_config, is_preset

__all__ = [
    "DataSection",
    "DiscriminatorSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "SamplesSection",
    "TrainConfig",
    "TrainerSection",
    "load_config",
]


#: The largest training / validation crop side accepted.
MAX_IMAGE_SIZE = 16384


@dataclass
class ModelSection:
    """The model trained. Tokenizer task: ``preset`` names a registered WeTok configuration; ``overrides`` changes
    WeTokConfig fields (e.g. the quantizer's loss weights, ``codebook_form``); ``init``: stage 2 (required) or a
    warm start for stage 1: a training checkpoint (``.pt``, its EMA weights) or a native model directory.
    Generator task: ``preset`` names a WeTok-AR configuration (``llama_B_GFQ``, ``ar-small``, ...) and
    ``overrides`` changes WeTokARConfig fields (the token grid, groups, bits and class count default to the token
    shards'); ``init``: a warm start (a generator training checkpoint or a saved WeTokAR folder); ``tokenizer``:
    the tokenizer that decodes sample grids and is exported with the model (anything ``--model`` accepts; by
    default the one named in the token shards, when it can be found locally)."""

    preset: str | None = "small-f8"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    tokenizer: str | None = None


@dataclass
class LossSection:
    """Loss weights (spec §4). ``gan_weight: null`` switches on VQGAN's adaptive weight scaled by
    ``adaptive_scale``; ``gan_start`` is the step at which GAN and discriminator terms start (official 0).
    The quantizer's entropy / commitment weights are WeTokConfig fields (``model.overrides``). ``lowpass_weight``
    (not official, default 0): L1 between the ``lowpass_factor`` x ``lowpass_factor`` block averages of image
    and reconstruction, a colour / layout anchor for stage 2."""

    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_net: str = "vgg"
    perceptual_pretrained: bool = True
    gan_weight: float | None = 0.1
    adaptive_scale: float = 0.8
    gan_start: int = 0
    lecam_weight: float = 0.05
    lecam_decay: float = 0.999
    lowpass_weight: float = 0.0
    lowpass_factor: int = 8


@dataclass
class DiscriminatorSection:
    """PatchGAN discriminator: ``norm`` is batch (official, per-process statistics), sync_batch (global-batch
    statistics) or none."""

    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"


@dataclass
class OptimSection:
    """Tokenizer task: Adam(betas) for the tokenizer and its discriminator (``weight_decay`` as Adam's L2 term).
    Generator task: AdamW(betas) with decoupled ``weight_decay`` on the tensors with >= 2 dimensions only (weight
    matrices and embeddings; not norms or biases), the intended official setting; ``weight_decay_all: true``
    applies it to every tensor, which is what the official code ends up doing (its decay annealing overwrites the
    no-decay group; spec §7.3).
    Schedule: ``warmup_steps`` of linear warm-up from ``warmup_start * lr`` (0: from lr / warmup_steps at the
    first step), then ``hold_steps`` at ``lr``, then ``schedule``: constant (official tokenizer), cosine or linear
    (official generator) decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``. ``grad_clip``: max global norm
    or null."""

    lr: float = 1e-4
    disc_lr: float | None = None
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    weight_decay_all: bool = False
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_start: float = 0.0
    hold_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None


@dataclass
class DataSection:
    """Training / validation data. ``train``: an image folder (recursive: any folder, ImageNet ``train/``, COCO
    ``train2017/``), a ``.txt`` list of image paths (relative to the list's folder), or WebDataset-style tar
    shards (``/data/shard-{000000..000999}.tar``, a glob, or a folder of ``.tar`` files).
    ``batch_size`` is the global batch (all processes, all accumulation steps); ``micro_batch_size`` the batch
    of one forward pass on one device; the accumulation is batch_size / (micro_batch_size * processes).
    Training crops: resize the short side to ``resize_size`` (null: ``image_size``), then an ``image_size``
    ``random`` (ImageNet recipe) or ``center`` (web-data recipe) crop; images with a short side below
    ``min_side`` or an aspect ratio above ``max_aspect`` are skipped (the official web-data filter: 512 and 2).
    Generator task: ``train`` / ``val`` are token-shard folders (``wetok tokenize``); ``views`` keeps only the
    samples of those preprocessing views (e.g. ``[center]``; null: all); ``val_max_images`` caps the validation
    samples; the image-crop keys do not apply."""

    train: str | None = None
    val: str | None = None
    image_size: int = 256
    resize_size: int | None = None
    crop: str = "random"
    min_side: int = 0
    max_aspect: float | None = None
    hflip: bool = False
    batch_size: int = 128
    micro_batch_size: int = 4
    num_workers: int = 4
    val_image_size: int | None = None
    val_batch_size: int = 16
    val_max_images: int | None = 1000
    views: list[str] | None = None


@dataclass
class TrainerSection:
    """Engine settings. ``task``: tokenizer or generator. ``precision``: 32, 16-mixed or bf16-mixed. Steps count generator updates; training
    stops at ``max_steps`` or after ``max_minutes`` of wall-clock time (then with a checkpoint, like at the end).
    Logging, validation, image grids and checkpoints happen every ``*_every`` steps (0 = never). The EMA of the
    weights (what validation and export use) has ``ema_decay``; ``ema_warmup`` caps it at (1 + n) / (10 + n)
    after n steps (off in the official recipes; on for short runs); ``ema: false`` keeps none (then validation,
    sample grids and export use the live weights)."""

    task: str = "tokenizer"
    stage: int = 1
    max_steps: int = 100_000
    max_minutes: float | None = None
    precision: str = "32"
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    seed: int = 0
    ema: bool = True
    ema_decay: float = 0.999
    ema_warmup: bool = False
    log_every: int = 50
    val_every: int = 2000
    image_every: int = 2000
    checkpoint_every: int = 2000
    keep_checkpoints: int = 3
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class SamplesSection:
    """Generator task: the sample grid written every ``trainer.image_every`` steps, one row per class of
    ``classes`` (null: the first ten), ``per_class`` samples each, drawn with a fixed seed (``trainer.seed``) with
    guidance ``cfg_scale`` (one value or one per sub-token) and the sampler's ``temperature`` / ``top_k`` /
    ``top_p``. Decoded with the tokenizer (``model.tokenizer``) when one is available, else a picture of the token
    maps."""

    classes: list[int] | None = None
    per_class: int = 4
    cfg_scale: float | list[float] = 2.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


_SECTIONS = {
    "model": ModelSection,
    "loss": LossSection,
    "discriminator": DiscriminatorSection,
    "optim": OptimSection,
    "data": DataSection,
    "trainer": TrainerSection,
    "samples": SamplesSection,
}
#: Ranges of the numeric recipe fields: (low, high, low bound excluded); None: unbounded. Sizes are capped so that
#: a typing slip cannot ask for terabytes.
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "loss.l1_weight": (0, None, False), "loss.perceptual_weight": (0, None, False),
    "loss.gan_weight": (0, None, False), "loss.adaptive_scale": (0, None, False), "loss.gan_start": (0, None, False),
    "loss.lecam_weight": (0, None, False), "loss.lecam_decay": (0, 1, False),
    "loss.lowpass_weight": (0, None, False), "loss.lowpass_factor": (1, 64, False),
    "discriminator.ndf": (1, 4096, False), "discriminator.n_layers": (0, 8, False),
    "optim.lr": (0, None, True), "optim.disc_lr": (0, None, True), "optim.weight_decay": (0, None, False),
    "optim.warmup_steps": (0, None, False), "optim.warmup_start": (0, 1, False), "optim.hold_steps": (0, None, False),
    "optim.min_lr_ratio": (0, 1, False), "optim.grad_clip": (0, None, True),
    "data.image_size": (1, MAX_IMAGE_SIZE, False), "data.resize_size": (1, MAX_IMAGE_SIZE, False),
    "data.min_side": (0, None, False),
    "data.max_aspect": (1, None, False), "data.batch_size": (1, 2**24, False),
    "data.micro_batch_size": (1, 2**16, False), "data.num_workers": (0, 1024, False),
    "data.val_image_size": (1, MAX_IMAGE_SIZE, False), "data.val_batch_size": (1, 2**16, False),
    "data.val_max_images": (0, None, False),
    "trainer.max_steps": (1, 2**48, False), "trainer.max_minutes": (0, None, True),
    "trainer.num_nodes": (1, 2**16, False), "trainer.seed": (0, 2**32 - 1, False), "trainer.ema_decay": (0, 1, False),
    "trainer.log_every": (0, None, False), "trainer.val_every": (0, None, False),
    "trainer.image_every": (0, None, False), "trainer.checkpoint_every": (0, None, False),
    "trainer.keep_checkpoints": (0, None, False),
    "samples.per_class": (1, 1024, False), "samples.temperature": (0, None, True), "samples.top_k": (0, None, False),
    "samples.top_p": (0, 1, True),
}
_SECTION_NAMES = {cls: name for name, cls in _SECTIONS.items()}
TASKS = ("tokenizer", "generator")


@dataclass
class TrainConfig:
    """A complete training recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    discriminator: DiscriminatorSection = field(default_factory=DiscriminatorSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    samples: SamplesSection = field(default_factory=SamplesSection)

    @property
    def task(self) -> str:
        return self.trainer.task

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: object = "config") -> TrainConfig:
        cfg = cls()
        _merge(cfg, data, source)
        cfg.validate(source)
        return cfg

    def model_config(self) -> Any:
        """The configuration of the model to build from preset + overrides: a WeTokConfig (tokenizer task) or a
        WeTokARConfig (generator task; before the token shards' grid / groups / bits / classes are filled in)."""
        if self.task == "generator":
            from ..generation import WeTokARConfig
            from ..generation.config import get_ar_config

            if self.model.preset is None:
                return WeTokARConfig(**self.model.overrides)
            return get_ar_config(self.model.preset, **self.model.overrides)
        if self.model.preset is None:
            return WeTokConfig(**self.model.overrides)
        return get_config(self.model.preset, **self.model.overrides)

    def validate(self, source: object = "config") -> None:
        """Raise :class:`InputError` naming ``source`` for inconsistent settings."""

        def bad(msg: str) -> None:
            raise InputError(source, msg)

        t, d, o = self.trainer, self.data, self.optim
        self._check_types(source)
        for name, (low, high, low_open) in _RANGES.items():
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if value is None:
                continue
            number = float(value)
            if (not math.isfinite(number) or (low is not None and (number < low or (low_open and number == low)))
                    or (high is not None and number > high)):
                limits = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + (
                    [f"<= {high}"] if high is not None else [])
                bad(f"{name} must be {' and '.join(limits)}, got {value}")
        if not all(0.0 <= b < 1.0 for b in o.betas):
            bad(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
        scales = self.samples.cfg_scale if isinstance(self.samples.cfg_scale, list) else [self.samples.cfg_scale]
        if not scales or not all(math.isfinite(c) and c >= 0 for c in scales):
            bad(f"samples.cfg_scale must be a number >= 0 or a list of them, got {self.samples.cfg_scale}")
        if t.task not in TASKS:
            bad(f"trainer.task must be one of {', '.join(TASKS)}, got {t.task!r}")
        if t.stage not in (1, 2):
            bad(f"trainer.stage must be 1 or 2, got {t.stage}")
        if t.stage == 2 and not self.model.init and t.task == "tokenizer":
            bad("stage 2 needs model.init: the stage-1 checkpoint (.pt) or model directory")
        if t.precision not in ("32", "16-mixed", "bf16-mixed"):
            bad(f"trainer.precision must be 32, 16-mixed or bf16-mixed, got {t.precision!r}")
        if o.schedule not in ("constant", "cosine", "linear"):
            bad(f"optim.schedule must be constant, cosine or linear, got {o.schedule!r}")
        if self.discriminator.norm not in ("batch", "sync_batch", "none"):
            bad(f"discriminator.norm must be batch, sync_batch or none, got {self.discriminator.norm!r}")
        if self.loss.perceptual_net not in ("vgg", "alex", "squeeze"):
            bad(f"loss.perceptual_net must be vgg, alex or squeeze (the LPIPS networks), got {self.loss.perceptual_net!r}")
        if d.crop not in ("random", "center"):
            bad(f"data.crop must be random or center, got {d.crop!r}")
        if d.batch_size < 1 or d.micro_batch_size < 1 or d.batch_size % d.micro_batch_size:
            bad(f"data.batch_size ({d.batch_size}) must be a multiple of data.micro_batch_size ({d.micro_batch_size})")
        devices = t.devices if isinstance(t.devices, int) and not isinstance(t.devices, bool) else None
        if devices is not None and d.batch_size % (d.micro_batch_size * devices * t.num_nodes):
            bad(f"data.batch_size {d.batch_size} must be trainer.devices {devices} x trainer.num_nodes {t.num_nodes} "
                f"x data.micro_batch_size {d.micro_batch_size} x accumulation steps; "
                f"{devices * t.num_nodes * d.micro_batch_size} does not divide it")
        if t.max_steps < 1:
            bad("trainer.max_steps must be >= 1")
        if o.warmup_steps < 0 or o.hold_steps < 0 or not 0.0 <= o.warmup_start <= 1.0:
            bad("optim.warmup_steps / hold_steps must be >= 0 and optim.warmup_start in [0, 1]")
        if t.task == "generator":
            self._validate_generator(bad)
        elif self.model.preset is not None and not is_preset(self.model.preset):
            bad(f"unknown model.preset {self.model.preset!r}")
        try:
            model = self.model_config()
        except (TypeError, ValueError, KeyError) as err:
            bad(f"invalid model settings: {str(err).strip(chr(34))}")
        if t.task == "tokenizer":
            f = model.downsample_factor
            for key in ("image_size", "val_image_size"):
                size = getattr(d, key)
                if size is not None and size % f:
                    bad(f"data.{key} ({size}) must be a multiple of the model's downsampling factor {f}")
            if d.resize_size is not None and d.resize_size < d.image_size:
                bad(f"data.resize_size ({d.resize_size}) must be at least data.image_size ({d.image_size}), the crop")

    def _check_types(self, source: object) -> None:
        """Every field of the recipe has its declared type (fields set in Python skip :func:`_merge`)."""
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise InputError(source, f"section {name!r} must be a mapping")
            for f in fields(cls):
                setattr(section, f.name, _coerce(getattr(section, f.name), cls, f.name, source))

    def _validate_generator(self, bad: Any) -> None:
        from ..generation.config import is_ar_preset, list_ar_presets

        if self.model.preset is not None and not is_ar_preset(self.model.preset):
            bad(f"model.preset {self.model.preset!r} is not a generator configuration (known: "
                f"{', '.join(list_ar_presets())})")
        s = self.samples
        if s.per_class < 1 or (s.classes is not None and not all(isinstance(c, int) and c >= 0 for c in s.classes)):
            bad("samples.per_class must be >= 1 and samples.classes a list of class numbers")


def _coerce(value: Any, section: type, key: str, source: object) -> Any:
    """A YAML value checked against the type of the recipe field ``section.key`` it sets."""
    hint = typing.get_type_hints(section)[key]
    if key == "precision" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # `precision: 32` reads as an integer
    try:
        return conform(value, hint)
    except TypeError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        name = f"{_SECTION_NAMES[section]}.{key}"
        raise InputError(source, f"{name} must be {describe_type(hint)}, got {shown}") from None


def _merge(cfg: TrainConfig, data: dict[str, Any], source: object) -> None:
    if not isinstance(data, dict):
        raise InputError(source, "a training config must be a mapping of sections")
    for section, values in data.items():
        if section == "task":  # shorthand for trainer.task
            values, section = {"task": values}, "trainer"
        if section not in _SECTIONS:
            raise InputError(source, f"unknown section {section!r} (known: task, {', '.join(_SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise InputError(source, f"section {section!r} must be a mapping")
        target = getattr(cfg, section)
        known = {f.name for f in fields(target)}
        for key, value in values.items():
            if key not in known:
                raise InputError(source, f"unknown key {section}.{key} (known: {', '.join(sorted(known))})")
            if isinstance(value, str) and value.startswith("~/"):
                value = str(Path(value).expanduser())
            if key == "overrides" and isinstance(value, dict):
                value = {**target.overrides, **value}
            setattr(target, key, _coerce(value, type(target), key, source))


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.lr=2e-4", "model.overrides.channels=32"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise InputError("override", f"{item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise InputError("override", f"{key!r} must name section.key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError, ValueError) as err:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise InputError("override", f"cannot parse the value of {key}: {reason}") from err
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a recipe (or start from the defaults with ``path=None``) and apply ``key=value`` overrides."""
    cfg = TrainConfig()
    source: object = "defaults"
    if path is not None:
        path = Path(path)
        data = read_yaml(path, "training config")
        if data is None:
            data = {}
        _merge(cfg, data, path)
        source = path
    if overrides:
        _merge(cfg, parse_overrides(overrides), "override")
        source = f"{path} with overrides" if path is not None else "override"
    cfg.validate(source)
    return cfg


def replace_section(cfg: TrainConfig, section: str, **changes: Any) -> TrainConfig:
    """A copy of ``cfg`` with fields of one section changed (handy in tests and scripts)."""
    new = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
    new.validate()
    return new
