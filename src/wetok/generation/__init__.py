"""Class-conditional generation on WeTok tokens: the WeTok-AR transformer, its sampler and official import.

Data path: class -> transformer -> sub-token logits -> sampler -> tokens -> the tokenizer's decoder -> image.
"""

from pathlib import Path
from typing import Any

from .config import AR_PRESETS, WeTokARConfig, get_ar_config, is_ar_preset, list_ar_presets
from .images import generate_images, iter_images
from .model import WeTokAR
from .sampler import KVCache, SamplingSettings, generate, guide, sample_logits, top_k_filter, top_p_filter

#: The generator bundled in the package (CIFAR-10, 32 x 32), with its tokenizer in ``tokenizer/``.
BUNDLED_GENERATOR = "cifar10-ar"
BUNDLED_GENERATOR_DIR = Path(__file__).resolve().parent.parent / "weights" / BUNDLED_GENERATOR


def _load_bundled(entry: Any, *, progress: bool = True, **_: Any) -> WeTokAR:
    from .pretrained import load_pretrained_ar

    model = load_pretrained_ar(entry.weights.location, progress=progress)
    model.name_or_path = entry.name
    return model


def _register() -> None:
    """Enter the generator configurations and the bundled generator into the model registry (``wetok info``
    lists them); the registry itself registers its tokenizer, ``cifar10-tokenizer``."""
    from ..registry import ModelEntry, Weights, register_model
    from .pretrained import read_ar_config

    for name, config in AR_PRESETS.items():
        if name.startswith("llama_"):
            size = name.split("_")[1]
            description = (f"official WeTok-AR-{size} configuration (no native weights published; load an official "
                           ".ckpt with its GenStage YAML)")
        else:
            description = "generator configuration for CPU work (for training and tests)"
        register_model(ModelEntry(name, "generator", config, None, description, build=WeTokAR), overwrite=True)
    if (BUNDLED_GENERATOR_DIR / "config.json").is_file():
        register_model(ModelEntry(BUNDLED_GENERATOR, "generator", read_ar_config(BUNDLED_GENERATOR_DIR / "config.json"),
                                  Weights("bundled", str(BUNDLED_GENERATOR_DIR)),
                                  "bundled in the package: class-conditional CIFAR-10 (32 x 32) generator with its "
                                  "tokenizer, CPU-trained (docs/cifar10-generator.md)",
                                  build=WeTokAR, load=_load_bundled), overwrite=True)


_register()

__all__ = [
    "AR_PRESETS",
    "KVCache",
    "SamplingSettings",
    "WeTokAR",
    "WeTokARConfig",
    "generate",
    "generate_images",
    "get_ar_config",
    "guide",
    "is_ar_preset",
    "iter_images",
    "list_ar_presets",
    "sample_logits",
    "top_k_filter",
    "top_p_filter",
]
