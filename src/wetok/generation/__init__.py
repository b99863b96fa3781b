"""Class-conditional generation on WeTok tokens: the WeTok-AR transformer, its sampler and official import.

Data path: class -> transformer -> sub-token logits -> sampler -> tokens -> the tokenizer's decoder -> image.
"""

from .config import AR_PRESETS, WeTokARConfig, get_ar_config, is_ar_preset, list_ar_presets
from .model import WeTokAR
from .sampler import KVCache, generate, guide, sample_logits, top_k_filter, top_p_filter

__all__ = [
    "AR_PRESETS",
    "KVCache",
    "WeTokAR",
    "WeTokARConfig",
    "generate",
    "get_ar_config",
    "guide",
    "is_ar_preset",
    "list_ar_presets",
    "sample_logits",
    "top_k_filter",
    "top_p_filter",
]
