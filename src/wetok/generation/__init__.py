"""Class-conditional generation on WeTok tokens: the WeTok-AR transformer, its sampler and official import.

Data path: class -> transformer -> sub-token logits -> sampler -> tokens -> the tokenizer's decoder -> image.
"""

from .config import AR_PRESETS, WeTokARConfig, get_ar_config, is_ar_preset, list_ar_presets
from .images import generate_images, iter_images
from .model import WeTokAR
from .sampler import KVCache, SamplingSettings, generate, guide, sample_logits, top_k_filter, top_p_filter


def _register() -> None:
    """Enter the generator configurations into the model registry (``wetok info`` lists them)."""
    from ..registry import ModelEntry, register_model

    for name, config in AR_PRESETS.items():
        if name.startswith("llama_"):
            size = name.split("_")[1]
            description = (f"official WeTok-AR-{size} configuration (no native weights published; load an official "
                           ".ckpt with its GenStage YAML)")
        else:
            description = "generator configuration for CPU work (for training and tests)"
        register_model(ModelEntry(name, "generator", config, None, description, build=WeTokAR), overwrite=True)


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
