"""The dataclass that describes a WeTok-AR generator, saved as ``config.json`` beside its weights, and the named
configurations (the three official ones plus small ones for CPU work)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .._validate import check_float, check_int, check_optional_str, check_size

#: Bounds of the fields that set sizes (the parameter count is bounded too: ``WETOK_MAX_PARAMETERS``).
MAX_GRID_SIDE = 256
#: Bound of the 2D RoPE table's float32 entries, (1 + h * w) * head_dim (512 MiB).
MAX_ROPE_ENTRIES = 2**27
MAX_WIDTH = 65536
MAX_LAYERS = 256


def default_ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden width of the official blocks: 8 * dim / 3 (truncated) rounded up to a multiple of 256."""
    hidden = int(8 * dim / 3)
    return -(-hidden // multiple_of) * multiple_of


@dataclass(frozen=True)
class WeTokARConfig:
    """A class-conditional autoregressive model over WeTok tokens.

    Tokens: a ``grid_height`` x ``grid_width`` map of positions, each with ``groups`` sub-tokens of
    ``bits_per_group`` bits (the tokenizer's groups; sub-token i is group i's index). Classes 0 ..
    ``num_classes`` - 1, plus the null class ``num_classes`` for classifier-free guidance.
    Transformer: width ``dim``, ``n_head`` heads, ``spatial_layers`` causal blocks over positions and
    ``intra_layers`` causal blocks over the sub-tokens of one position, SwiGLU hidden width ``ffn_hidden``
    (None: the official rounding of 8 * dim / 3), 2D RoPE with base ``rope_base``.
    Training-only: dropout on the input embeddings (``token_dropout``), after attention (``resid_dropout``) and in
    the FFN (``ffn_dropout``); ``class_dropout`` is the probability of replacing a label by the null class.
    Fields are checked on construction (exact types, ranges) and the parameter count (:meth:`num_parameters`)
    must not exceed ``$WETOK_MAX_PARAMETERS`` (default 2e9).
    """

    num_classes: int = 1000
    grid_height: int = 16
    grid_width: int = 16
    groups: int = 4
    bits_per_group: int = 8
    dim: int = 1024
    n_head: int = 16
    spatial_layers: int = 24
    intra_layers: int = 2
    ffn_hidden: int | None = None
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    class_dropout: float = 0.1
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # provenance, informative only
    name: str | None = None

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            check_int("dim", self.dim, 1, MAX_WIDTH)
            object.__setattr__(self, "ffn_hidden", default_ffn_hidden(self.dim))
        limits = {"num_classes": 10**7, "grid_height": MAX_GRID_SIDE, "grid_width": MAX_GRID_SIDE, "groups": 256,
                  "bits_per_group": 20, "dim": MAX_WIDTH, "n_head": MAX_WIDTH, "spatial_layers": MAX_LAYERS,
                  "intra_layers": MAX_LAYERS, "ffn_hidden": 4 * MAX_WIDTH}
        for key, high in limits.items():  # bits_per_group above 20 gives an impractically large output head
            object.__setattr__(self, key, check_int(key, getattr(self, key), 1, high))
        if self.dim % self.n_head:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 4:
            raise ValueError(f"head_dim ({self.head_dim}) must be a multiple of 4 for the 2D RoPE")
        if self.groups > self.num_positions + 1:
            raise ValueError("groups must not exceed the number of positions + 1 (the intra-position RoPE "
                             "reuses the first entries of the spatial table)")
        if (1 + self.num_positions) * self.head_dim > MAX_ROPE_ENTRIES:
            raise ValueError(f"the RoPE table of {self.num_positions} positions x head_dim {self.head_dim} would "
                             f"exceed {MAX_ROPE_ENTRIES} entries")
        floats = {"token_dropout": (0.0, 1.0, False, True), "resid_dropout": (0.0, 1.0, False, True),
                  "ffn_dropout": (0.0, 1.0, False, True), "class_dropout": (0.0, 1.0, False, True),
                  "rope_base": (1.0, None, True, False), "norm_eps": (0.0, 1.0, True, False),
                  "init_std": (0.0, 1.0, False, False)}
        for key, (low, high, low_open, high_open) in floats.items():
            object.__setattr__(self, key, check_float(key, getattr(self, key), low, high, low_open=low_open,
                                                      high_open=high_open))
        check_optional_str("name", self.name)
        check_size("this generator", self.num_parameters())

    def num_parameters(self) -> int:
        """The number of parameters of the model this config builds, in closed form (known before anything is
        allocated): class and sub-token embeddings, the blocks (two RMSNorms, attention 4 dim^2, SwiGLU
        3 dim ffn_hidden), the final norm and the g output heads."""
        d, hidden = self.dim, self.ffn_hidden or default_ffn_hidden(self.dim)
        block = 2 * d + 4 * d * d + 3 * d * hidden
        return ((self.num_classes + 1) * d + 2 * self.groups * self.vocab_size * d
                + (self.spatial_layers + self.intra_layers) * block + d)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def num_positions(self) -> int:
        """h * w, the length of the spatial sequence (the class slot plus all positions but the last)."""
        return self.grid_height * self.grid_width

    @property
    def vocab_size(self) -> int:
        """2^d': the number of values one sub-token takes (the size of each output head)."""
        return 2**self.bits_per_group

    @property
    def null_class(self) -> int:
        """The label of the unconditional (dropped) class."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeTokARConfig:
        if not isinstance(data, dict):
            raise TypeError(f"a generator config must be a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(repr, set(data) - known))
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)[:300]}")
        return cls(**data)

    def replace(self, **changes: Any) -> WeTokARConfig:
        return replace(self, **changes)


_OFFICIAL = dict(num_classes=1000, grid_height=16, grid_width=16, groups=4, bits_per_group=8)

#: Named configurations. The official ones (parameters counted: 337.1M, 796.3M, 1477.0M) are the WeTok-AR models
#: on the f = 16, 4 x 8-bit ImageNet tokenizer; ``ar-tiny`` / ``ar-small`` are CPU sizes (8 x 8 positions, 10
#: classes by default: override ``grid_height``, ``grid_width``, ``groups``, ``bits_per_group`` to match a tokenizer).
AR_PRESETS: dict[str, WeTokARConfig] = {
    "llama_B_GFQ": WeTokARConfig(**_OFFICIAL, dim=1024, n_head=16, spatial_layers=24, intra_layers=2),
    "llama_L_GFQ": WeTokARConfig(**_OFFICIAL, dim=1280, n_head=20, spatial_layers=36, intra_layers=3),
    "llama_XL_GFQ": WeTokARConfig(**_OFFICIAL, dim=1536, n_head=24, spatial_layers=48, intra_layers=4),
    "ar-tiny": WeTokARConfig(num_classes=10, grid_height=8, grid_width=8, groups=4, bits_per_group=4, dim=64,
                             n_head=4, spatial_layers=2, intra_layers=1),
    "ar-small": WeTokARConfig(num_classes=10, grid_height=8, grid_width=8, groups=4, bits_per_group=8, dim=256,
                              n_head=8, spatial_layers=8, intra_layers=2),
}
AR_PRESETS = {name: replace(cfg, name=name) for name, cfg in AR_PRESETS.items()}


def list_ar_presets() -> list[str]:
    """Names of the registered generator configurations."""
    return sorted(AR_PRESETS)


def is_ar_preset(name: str) -> bool:
    return name in AR_PRESETS


def get_ar_config(name: str, **overrides: Any) -> WeTokARConfig:
    """The generator configuration registered as ``name``, with optional field overrides."""
    if name not in AR_PRESETS:
        raise KeyError(f"unknown generator preset {name!r}; available: {', '.join(list_ar_presets())}")
    cfg = AR_PRESETS[name]
    if "dim" in overrides and "ffn_hidden" not in overrides:
        overrides["ffn_hidden"] = None  # recompute from the new width
    return replace(cfg, **overrides)
