"""Named tokenizer configurations: every official WeTok configuration, plus small ones for CPU work.

Official names follow the official config files (``configs/WeToK/Inference/<name>_{imagenet,mscoco}.yaml``); the
``_imagenet`` / ``_mscoco`` suffixes name the validation set only and are accepted as aliases.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .config import WeTokConfig

_OFFICIAL_F8 = dict(channels=256, ch_mult=(1, 2, 2, 4), num_res_blocks=4, bits_per_group=8)
_OFFICIAL_F16 = dict(channels=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, bits_per_group=8)
_OFFICIAL_F32 = dict(channels=256, ch_mult=(1, 1, 2, 2, 4, 8), num_res_blocks=4, bits_per_group=8)

#: Official checkpoints on the Hugging Face Hub (repo ``GrayShine/WeTok``), where known.
OFFICIAL_HUB_FILES: dict[str, str] = {
    "ImageNet_downsample8": "ImageNet/downsample8/WeTok.ckpt",
    "ImageNet_downsample16": "ImageNet/downsample16/WeTok.ckpt",
    "GeneralDomain_compratio24": "GeneralDomain/compratio24/WeTok.ckpt",
    "GeneralDomain_compratio48": "GeneralDomain/compratio48/WeTok.ckpt",
    "GeneralDomain_compratio192": "GeneralDomain/compratio192/WeTok.ckpt",
    "GeneralDomain_compratio768": "GeneralDomain/compratio768/WeTok.ckpt",
}
OFFICIAL_HUB_REPO = "GrayShine/WeTok"

PRESETS: dict[str, WeTokConfig] = {
    # official configurations (compression ratio = 256*256*3*8 / latent bits)
    "GeneralDomain_compratio24": WeTokConfig(**_OFFICIAL_F8, z_channels=64, groups=8),
    "GeneralDomain_compratio48": WeTokConfig(**_OFFICIAL_F8, z_channels=32, groups=4),
    "GeneralDomain_compratio192": WeTokConfig(**_OFFICIAL_F16, z_channels=32, groups=4),
    "GeneralDomain_compratio768": WeTokConfig(**_OFFICIAL_F32, z_channels=32, groups=4, generative_decoder=True),
    "ImageNet_downsample8": WeTokConfig(**_OFFICIAL_F8, z_channels=32, groups=4),
    "ImageNet_downsample16": WeTokConfig(**_OFFICIAL_F16, z_channels=32, groups=4),
    # small configurations for CPU training, tests and demos
    "tiny-f8": WeTokConfig(channels=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16, groups=4,
                           bits_per_group=4),
    "tiny-f16": WeTokConfig(channels=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, z_channels=16, groups=4,
                            bits_per_group=4),
    # small-f8 is the bundled default model's architecture: 2.5M parameters, chosen for quality per CPU-hour
    "small-f8": WeTokConfig(channels=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=32, groups=4,
                            bits_per_group=8),
    "small-f16": WeTokConfig(channels=32, ch_mult=(1, 2, 2, 4, 4), num_res_blocks=1, z_channels=32, groups=4,
                             bits_per_group=8),
}
PRESETS = {name: replace(cfg, name=name) for name, cfg in PRESETS.items()}

_SUFFIXES = ("_imagenet", "_mscoco")


def list_presets(official: bool | None = None) -> list[str]:
    """Names of the registered configurations; ``official=True`` / ``False`` filters."""
    names = sorted(PRESETS)
    if official is None:
        return names
    return [n for n in names if (n in OFFICIAL_HUB_FILES) == official]


def canonical_name(name: str) -> str:
    """Resolve aliases (``ImageNet_downsample16_imagenet`` -> ``ImageNet_downsample16``)."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in PRESETS:
            return name[: -len(suffix)]
    return name


def is_preset(name: str) -> bool:
    return canonical_name(name) in PRESETS


def get_config(name: str, **overrides: Any) -> WeTokConfig:
    """The configuration registered as ``name``, with optional field overrides."""
    key = canonical_name(name)
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return replace(PRESETS[key], **overrides)
