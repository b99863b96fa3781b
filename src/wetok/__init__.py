"""wetok: the WeTok discrete visual tokenizer (group-wise lookup-free quantization, generative decoder)."""

from .config import WeTokConfig
from .errors import CheckpointError, InputError, ModelMismatchError, WetokError
from .model import WeTok, WeTokOutput
from .pipeline import WeTokPipeline
from .presets import get_config, list_presets
from .quantizer import GroupQuantizer, QuantizerOutput
from .registry import ModelEntry, Weights, create_model, list_models, register_model
from .tokens import Tokens

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GroupQuantizer",
    "InputError",
    "ModelEntry",
    "ModelMismatchError",
    "QuantizerOutput",
    "Tokens",
    "WeTok",
    "WeTokConfig",
    "WeTokOutput",
    "WeTokPipeline",
    "Weights",
    "WetokError",
    "create_model",
    "get_config",
    "list_models",
    "list_presets",
    "register_model",
]
