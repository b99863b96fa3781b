"""The one dataclass that describes a tokenizer; saved as ``config.json`` beside the weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ._validate import check_bool, check_choice, check_float, check_int, check_optional_str, check_size

#: Fields that fix the encoder and so the meaning of its tokens; the model identity hashes exactly these. The
#: decoder kind is left out on purpose: a stage-2 (generative-decoder) model decodes its stage-1 model's tokens.
ARCHITECTURE_FIELDS = (
    "channels",
    "ch_mult",
    "num_res_blocks",
    "z_channels",
    "groups",
    "bits_per_group",
    "norm_groups",
)


#: At most this many resolution levels (f <= 2^7) and residual blocks per level: more is no model anyone trains.
MAX_LEVELS = 8
MAX_RES_BLOCKS = 32


@dataclass(frozen=True)
class WeTokConfig:
    """A WeTok tokenizer.

    Architecture: base width ``channels``, per-level multipliers ``ch_mult`` (downsampling factor
    f = 2^(len(ch_mult)-1)), ``num_res_blocks`` per level (and in the middle), latent channels
    ``z_channels`` = ``groups`` * ``bits_per_group``, ``generative_decoder`` (noise channels into the decoder).
    Quantizer training options (not part of the identity): entropy ``temperature``, ``codebook_form``
    (grouped / pooled / joint), ``token_reduction`` (sum / mean over groups), loss weights.

    Every field is checked on construction (exact types: a bool or a float is not an integer; ranges; widths
    divisible by ``norm_groups``), and the parameter count (:meth:`num_parameters`, closed form) must not exceed
    ``$WETOK_MAX_PARAMETERS`` (default 2e9): a bad ``config.json`` fails before anything is allocated.
    """

    channels: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 32
    groups: int = 4
    bits_per_group: int = 8
    generative_decoder: bool = False
    norm_groups: int = 32
    # quantizer training options
    temperature: float = 0.01
    codebook_form: str = "grouped"
    token_reduction: str = "sum"
    token_weight: float = 1.0
    codebook_weight: float = 1.0
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    # provenance, informative only
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ch_mult, (str, bytes)) or not isinstance(self.ch_mult, (list, tuple)):
            raise TypeError(f"ch_mult must be a list of integers, got {self.ch_mult!r:.60}")
        if not 1 <= len(self.ch_mult) <= MAX_LEVELS:
            raise ValueError(f"ch_mult must have 1 to {MAX_LEVELS} levels, got {len(self.ch_mult)}")
        object.__setattr__(self, "ch_mult", tuple(check_int("ch_mult entry", m, 1, 64) for m in self.ch_mult))
        ints = {"channels": (1, 65536), "num_res_blocks": (1, MAX_RES_BLOCKS), "groups": (1, 4096),
                "bits_per_group": (1, 62), "z_channels": (1, None), "norm_groups": (1, None)}  # indices are int64
        for key, (low, high) in ints.items():
            object.__setattr__(self, key, check_int(key, getattr(self, key), low, high))
        check_bool("generative_decoder", self.generative_decoder)
        if self.z_channels != self.groups * self.bits_per_group:
            raise ValueError(
                f"z_channels ({self.z_channels}) must equal groups * bits_per_group "
                f"({self.groups} * {self.bits_per_group})"
            )
        for width in [self.channels] + [self.channels * m for m in self.ch_mult]:
            if width % self.norm_groups:
                raise ValueError(f"level width {width} is not divisible by norm_groups={self.norm_groups}")
        object.__setattr__(self, "temperature", check_float("temperature", self.temperature, 0.0, low_open=True))
        for key in ("token_weight", "codebook_weight", "entropy_weight", "commitment_weight"):
            object.__setattr__(self, key, check_float(key, getattr(self, key), 0.0))
        check_choice("codebook_form", self.codebook_form, ("grouped", "pooled", "joint"))
        check_choice("token_reduction", self.token_reduction, ("sum", "mean"))
        if self.codebook_form == "joint" and self.z_channels > 24:
            raise ValueError(f"codebook_form 'joint' needs z_channels <= 24 (2^z codes), got {self.z_channels}")
        check_optional_str("name", self.name)
        check_size("this tokenizer", self.num_parameters())

    def num_parameters(self) -> int:
        """The number of parameters of the model this config builds (encoder + decoder), in closed form: known
        before anything is allocated."""
        nrb, z, widths = self.num_res_blocks, self.z_channels, [self.channels * m for m in self.ch_mult]

        def res_block(cin: int, cout: int) -> int:  # two GroupNorms, two bias-free 3x3 convs, 1x1 shortcut
            return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)

        top = widths[-1]
        encoder = 27 * self.channels + nrb * res_block(top, top) + 2 * top + top * z + z
        block_in = self.channels
        for i, width in enumerate(widths):
            encoder += res_block(block_in, width) + (nrb - 1) * res_block(width, width)
            block_in = width
            if i < len(widths) - 1:
                encoder += 9 * width * width + width  # stride-2 conv
        decoder = 9 * z * (2 if self.generative_decoder else 1) * top + top + nrb * res_block(top, top)
        block_in = top
        for i in reversed(range(len(widths))):
            width = widths[i]
            decoder += 2 * (z * block_in + block_in)  # adaptive norm: gamma and beta linears
            decoder += res_block(block_in, width) + (nrb - 1) * res_block(width, width)
            block_in = width
            if i > 0:
                decoder += 36 * width * width + 4 * width  # upsampler conv to 4C
        decoder += 2 * block_in + 27 * block_in + 3
        return encoder + decoder

    @property
    def downsample_factor(self) -> int:
        """f: the image side divided by the token-map side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def bits_per_token(self) -> int:
        """Bits per spatial position, g * d'."""
        return self.groups * self.bits_per_group

    def compression_ratio(self, height: int = 256, width: int = 256) -> float:
        """(H * W * 3 * 8 bits) / latent bits, the paper's convention."""
        f = self.downsample_factor
        h, w = -(-height // f), -(-width // f)
        return height * width * 24 / (h * w * self.bits_per_token)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeTokConfig:
        if not isinstance(data, dict):
            raise TypeError(f"a tokenizer config must be a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(repr, set(data) - known))
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)[:300]}")
        return cls(**data)

    def replace(self, **changes: Any) -> WeTokConfig:
        return replace(self, **changes)

    def identity(self) -> str:
        """A 16-hex-digit hash of the encoder architecture and token layout, written into token files."""
        arch = {k: getattr(self, k) for k in ARCHITECTURE_FIELDS}
        arch["ch_mult"] = list(arch["ch_mult"])
        blob = json.dumps(arch, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
