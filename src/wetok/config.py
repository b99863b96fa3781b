"""The one dataclass that describes a tokenizer; saved as ``config.json`` beside the weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

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


@dataclass(frozen=True)
class WeTokConfig:
    """A WeTok tokenizer.

    Architecture: base width ``channels``, per-level multipliers ``ch_mult`` (downsampling factor
    f = 2^(len(ch_mult)-1)), ``num_res_blocks`` per level (and in the middle), latent channels
    ``z_channels`` = ``groups`` * ``bits_per_group``, ``generative_decoder`` (noise channels into the decoder).
    Quantizer training options (not part of the identity): entropy ``temperature``, ``codebook_form``
    (grouped / pooled / joint), ``token_reduction`` (sum / mean over groups), loss weights.
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
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.z_channels != self.groups * self.bits_per_group:
            raise ValueError(
                f"z_channels ({self.z_channels}) must equal groups * bits_per_group "
                f"({self.groups} * {self.bits_per_group})"
            )
        if not self.ch_mult:
            raise ValueError("ch_mult must not be empty")
        for width in [self.channels * m for m in self.ch_mult]:
            if width % self.norm_groups:
                raise ValueError(f"level width {width} is not divisible by norm_groups={self.norm_groups}")
        if self.bits_per_group > 62:
            raise ValueError("bits_per_group must be at most 62 (indices are int64)")

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> WeTokConfig:
        return replace(self, **changes)

    def identity(self) -> str:
        """A 16-hex-digit hash of the encoder architecture and token layout, written into token files."""
        arch = {k: getattr(self, k) for k in ARCHITECTURE_FIELDS}
        arch["ch_mult"] = list(arch["ch_mult"])
        blob = json.dumps(arch, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
