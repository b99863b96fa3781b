"""wetok: the WeTok discrete visual tokenizer (group-wise lookup-free quantization, generative decoder)."""

from .config import WeTokConfig
from .errors import CheckpointError, InputError, ModelMismatchError, WetokError
from .model import Tokens, WeTok, WeTokOutput
from .presets import get_config, list_presets
from .quantizer import GroupQuantizer, QuantizerOutput

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GroupQuantizer",
    "InputError",
    "ModelMismatchError",
    "QuantizerOutput",
    "Tokens",
    "WeTok",
    "WeTokConfig",
    "WeTokOutput",
    "WetokError",
    "get_config",
    "list_presets",
]
