"""Checks of a generator's configuration and weights made before anything is built or allocated.

Every loader (native folder, official ``.ckpt``, ``wetok train`` checkpoint) reads the tensor names and shapes
of its file first (a safetensors or memory-mapped header) and compares them with the shapes the configuration
needs, computed here in closed form without building the model. So a model is only built when the file holds
all its weights: memory is bounded by the file's size. The configuration's own sizes (grid, widths, layers,
parameters) are bounded by :class:`~wetok.generation.config.WeTokARConfig` itself, when it is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError
from .config import WeTokARConfig

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
    return config.num_parameters()


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


def check_state_shapes(config: WeTokARConfig, shapes: Mapping[str, Sequence[int]], source: object) -> None:
    """Refuse unless ``shapes`` (tensor name -> shape, read from a file's header) are exactly the tensors
    ``WeTokAR(config)`` needs: :class:`CheckpointError` naming ``source`` and the first difference."""
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
