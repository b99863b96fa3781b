"""Checks of a generator's configuration and weights made before anything is built or allocated.

Every loader (native folder, official ``.ckpt``, ``wetok train`` checkpoint) reads the tensor names and shapes
of its file first (a safetensors or memory-mapped header) and compares them with the shapes the configuration
needs, computed here in closed form without building the model. So a model is only built when the file holds
all its weights: memory is bounded by the file's size, and a small config.json asking for 10^7 layers or a
10^6-wide model is refused at once. The limits below bound what no weight file can: the token grid (the RoPE
table and the sampler's work grow with it) and the model a registered name may build without weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError, InputError
from .config import WeTokARConfig

#: Most positions (grid_height x grid_width) of a generator: a 256 x 256 token grid (the official models: 16 x 16).
MAX_AR_POSITIONS = 1 << 16
#: Most parameters of a generator (float32: 32 GiB; the largest official model has 1.48e9).
MAX_AR_PARAMETERS = 8 * 10**9

_INT_FIELDS = ("num_classes", "grid_height", "grid_width", "groups", "bits_per_group", "dim", "n_head",
               "spatial_layers", "intra_layers", "ffn_hidden")
_FLOAT_FIELDS = ("rope_base", "norm_eps", "init_std")
#: Tensors of one transformer block (name suffix, shape as a function of dim and the FFN width).
_BLOCK = (("attention_norm.weight", lambda d, h: (d,)), ("attention.wqkv.weight", lambda d, h: (3 * d, d)),
          ("attention.wo.weight", lambda d, h: (d, d)), ("ffn_norm.weight", lambda d, h: (d,)),
          ("feed_forward.w1.weight", lambda d, h: (h, d)), ("feed_forward.w3.weight", lambda d, h: (h, d)),
          ("feed_forward.w2.weight", lambda d, h: (d, h)))


def num_state_tensors(config: WeTokARConfig) -> int:
    """How many tensors :class:`WeTokAR`'s state dict has."""
    return 2 + 2 * config.groups + len(_BLOCK) * (config.spatial_layers + config.intra_layers)


def parameter_count(config: WeTokARConfig) -> int:
    """The number of parameters of ``WeTokAR(config)``, in closed form (nothing is built)."""
    d, h, v, g = config.dim, config.ffn_hidden or 0, config.vocab_size, config.groups
    block = 2 * d + 4 * d * d + 3 * d * h
    return (config.num_classes + 1) * d + 2 * g * v * d + (config.spatial_layers + config.intra_layers) * block + d


def state_shapes(config: WeTokARConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of ``WeTokAR(config).state_dict()``, without building the model."""
    d, h, v = config.dim, config.ffn_hidden or 0, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"class_emb.embedding_table.weight": (config.num_classes + 1, d)}
    shapes.update({f"token_emb.{i}.weight": (v, d) for i in range(config.groups)})
    for stack, layers in (("spatial_blocks", config.spatial_layers), ("intra_blocks", config.intra_layers)):
        for layer in range(layers):
            shapes.update({f"{stack}.{layer}.{name}": shape(d, h) for name, shape in _BLOCK})
    shapes["norm.weight"] = (d,)
    shapes.update({f"head.{i}.weight": (v, d) for i in range(config.groups)})
    return shapes


def check_config(config: WeTokARConfig, source: object) -> None:
    """Refuse field types a model cannot be built from and sizes over the limits, naming ``source``."""
    for key in _INT_FIELDS:
        value = getattr(config, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(source, f"generator config field {key} must be an integer, got {value!r:.40}")
    for key in _FLOAT_FIELDS:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise InputError(source, f"generator config field {key} must be a positive finite number, "
                                     f"got {value!r:.40}")
    if config.name is not None and not (isinstance(config.name, str) and len(config.name) <= 200
                                        and config.name.isprintable()):
        raise InputError(source, "generator config field name must be a printable string of at most 200 characters")
    if config.num_positions > MAX_AR_POSITIONS:
        raise InputError(source, f"a {config.grid_height} x {config.grid_width} token grid is over the limit of "
                                 f"{MAX_AR_POSITIONS} positions")
    count = parameter_count(config)
    if count > MAX_AR_PARAMETERS:
        raise InputError(source, f"the config describes {count:.3g} parameters, over the limit of "
                                 f"{MAX_AR_PARAMETERS:.3g}")


def check_state_shapes(config: WeTokARConfig, shapes: Mapping[str, Sequence[int]], source: object) -> None:
    """Refuse unless ``shapes`` (tensor name -> shape, read from a file's header) are exactly the tensors
    ``WeTokAR(config)`` needs: :class:`CheckpointError` naming ``source`` and the first difference."""
    check_config(config, source)
    needed = num_state_tensors(config)
    if needed > len(shapes) + 64:  # do not even list the names of a model far larger than the file
        raise CheckpointError(f"{source}: the config needs {needed} tensors, the file holds {len(shapes)}")
    expected = state_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not match the config: {len(missing)} missing "
                              f"{_first(missing)}, {len(unexpected)} unexpected {_first(unexpected)}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(shapes[key])}, the config needs {shape}")


def check_state_values(state: Mapping[str, Tensor], source: object) -> None:
    """Refuse non-floating-point tensors and NaN or infinite weights (they would only fail while sampling)."""
    for key, value in state.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: {key} is {kind}; weights must be floating-point tensors")
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values")


def _first(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(name[:80]) for name in names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]"
