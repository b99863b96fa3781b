"""Group-wise lookup-free quantization (GQ), WeTok paper Sec. 3.1.

A latent ``u`` of shape (B, d, h, w) is split along channels into ``groups`` g groups of ``bits_per_group`` d'
channels (group k owns channels [k*d', (k+1)*d')). Every channel is quantized to its sign, with 0 -> -1 as in
the official code, and values +1/-1 (no 1/sqrt(d) scaling). Each group's bits form an index in [0, 2^d'):

    index_k = sum_j [u_{k*d'+j} > 0] * 2^j        (bit j = channel j of the group, least significant first)

g = 1 is LFQ (MAGVIT-v2), g = d is BSQ-style per-bit quantization. Indices are returned as an integer tensor of
shape (B, h, w, g); :func:`to_official_flat` gives the official flat layout (batch, h, w, group; group fastest).

Training adds entropy terms (see :mod:`wetok.entropy`) and a commitment term; both are computed in float32 even
under autocast and are zero in eval mode, like the official implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import entropy as _entropy
from .entropy import entropy_terms

__all__ = [
    "GroupQuantizer",
    "QuantizerOutput",
    "bits_to_indices",
    "codes_to_indices",
    "entropy_terms",
    "from_official_flat",
    "indices_to_bits",
    "indices_to_codes",
    "sign_quantize",
    "to_official_flat",
]


def sign_quantize(u: Tensor) -> Tensor:
    """+1 where ``u > 0``, else -1 (so exactly 0 maps to -1), with a straight-through gradient."""
    q = torch.where(u > 0, torch.ones_like(u), -torch.ones_like(u))
    return u + (q - u).detach()


def _bit_weights(bits_per_group: int, device: torch.device) -> Tensor:
    return torch.pow(2, torch.arange(bits_per_group, device=device, dtype=torch.int64))


def bits_to_indices(bits: Tensor) -> Tensor:
    """Bits (..., g, d') as 0/1 or bool -> indices (..., g), bit j least significant."""
    weights = _bit_weights(bits.shape[-1], bits.device)
    return (bits.to(torch.int64) * weights).sum(-1)


def indices_to_bits(indices: Tensor, bits_per_group: int) -> Tensor:
    """Indices (..., g) -> 0/1 int64 bits (..., g, d'), bit j least significant."""
    if indices.is_floating_point():
        raise TypeError("indices must be an integer tensor")
    if bits_per_group > 62:
        raise ValueError("bits_per_group above 62 cannot be held in int64 indices")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**bits_per_group):
        raise ValueError(f"indices must lie in [0, {2**bits_per_group}) for {bits_per_group} bits per group")
    weights = _bit_weights(bits_per_group, indices.device)
    return (indices.to(torch.int64).unsqueeze(-1) // weights) % 2


def indices_to_codes(indices: Tensor, bits_per_group: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Indices (B, h, w, g) -> codes (B, g*d', h, w) of +1/-1, group k on channels [k*d', (k+1)*d')."""
    if indices.dim() != 4:
        raise ValueError(f"expected indices of shape (B, h, w, g), got {tuple(indices.shape)}")
    b, h, w, g = indices.shape
    bits = indices_to_bits(indices, bits_per_group)  # (B, h, w, g, d')
    codes = bits.to(dtype) * 2 - 1
    return codes.reshape(b, h, w, g * bits_per_group).permute(0, 3, 1, 2).contiguous()


def codes_to_indices(codes: Tensor, groups: int) -> Tensor:
    """Latents or codes (B, d, h, w) -> indices (B, h, w, g) of their signs (0 counts as -1)."""
    if codes.dim() != 4:
        raise ValueError(f"expected codes of shape (B, d, h, w), got {tuple(codes.shape)}")
    b, d, h, w = codes.shape
    if d % groups:
        raise ValueError(f"{d} channels cannot be split into {groups} groups")
    bits = (codes > 0).permute(0, 2, 3, 1).reshape(b, h, w, groups, d // groups)
    return bits_to_indices(bits)


def to_official_flat(indices: Tensor) -> Tensor:
    """Indices (B, h, w, g) -> the official 1-D layout of length B*h*w*g, group fastest."""
    return indices.reshape(-1)


def from_official_flat(flat: Tensor, batch: int, height: int, width: int, groups: int) -> Tensor:
    """The official flat index layout (batch, h, w, group; group fastest) -> (B, h, w, g)."""
    expected = batch * height * width * groups
    if flat.numel() != expected:
        raise ValueError(f"expected {expected} indices for ({batch}, {height}, {width}, {groups}), got {flat.numel()}")
    return flat.reshape(batch, height, width, groups)


@dataclass
class QuantizerOutput:
    """What :class:`GroupQuantizer` returns.

    ``quantized`` is (B, d, h, w) of +1/-1 with a straight-through gradient; ``indices`` (B, h, w, g) int64;
    ``loss`` the weighted entropy + commitment loss (a zero scalar in eval mode). The remaining scalars are
    detached, for logging.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    token_entropy: Tensor | None = None
    codebook_entropy: Tensor | None = None
    commitment: Tensor | None = None
    batch_probs: dict[str, Tensor] = field(default_factory=dict)


class GroupQuantizer(nn.Module):
    """Group-wise lookup-free quantizer. It has no parameters and no state-dict entries.

    Args:
        groups: number of groups g (LFQ: 1, BSQ: d).
        bits_per_group: d', channels per group; the latent has g * d' channels.
        temperature: tau of the soft assignment softmax(2<u, c>/tau) used by the entropy terms.
        token_weight: weight of the per-token entropy (minimised).
        codebook_weight: weight of the codebook entropy (maximised).
        commitment_weight: weight of mean((u - sign(u))^2).
        entropy_weight: overall factor on (token_weight*token - codebook_weight*codebook), 0.1 in the official
            recipes.
        codebook_form: ``"grouped"`` (paper Eq. 8), ``"pooled"`` (official code) or ``"joint"`` (exact, small d).
        token_reduction: ``"sum"`` over groups (paper Eq. 6) or ``"mean"`` (official code).
    """

    def __init__(
        self,
        *,
        groups: int,
        bits_per_group: int,
        temperature: float = 0.01,
        token_weight: float = 1.0,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        codebook_form: str = "grouped",
        token_reduction: str = "sum",
    ) -> None:
        super().__init__()
        if groups < 1 or bits_per_group < 1:
            raise ValueError("groups and bits_per_group must be positive")
        if codebook_form not in ("grouped", "pooled", "joint"):
            raise ValueError(f"codebook_form must be grouped, pooled or joint, got {codebook_form!r}")
        if token_reduction not in ("sum", "mean"):
            raise ValueError(f"token_reduction must be sum or mean, got {token_reduction!r}")
        self.groups = groups
        self.bits_per_group = bits_per_group
        self.temperature = temperature
        self.token_weight = token_weight
        self.codebook_weight = codebook_weight
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.codebook_form = codebook_form
        self.token_reduction = token_reduction

    @property
    def dim(self) -> int:
        return self.groups * self.bits_per_group

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, bits_per_group={self.bits_per_group}, temperature={self.temperature}, "
            f"codebook_form={self.codebook_form!r}"
        )

    def forward(self, latents: Tensor) -> QuantizerOutput:
        """Quantize (B, d, h, w) latents; in training mode also compute the entropy and commitment loss."""
        if latents.dim() != 4 or latents.shape[1] != self.dim:
            raise ValueError(f"expected latents (B, {self.dim}, h, w), got {tuple(latents.shape)}")
        quantized = sign_quantize(latents)
        indices = codes_to_indices(latents.detach(), self.groups)
        if not (self.training and torch.is_grad_enabled()):
            zero = latents.new_zeros((), dtype=torch.float32)
            return QuantizerOutput(quantized=quantized, indices=indices, loss=zero)

        with torch.autocast(device_type=latents.device.type, enabled=False):
            u = latents.float() if latents.dtype != torch.float64 else latents
            flat = u.permute(0, 2, 3, 1).reshape(-1, self.dim)
            entropy, terms = _entropy.entropy_loss(
                flat,
                self.groups,
                temperature=self.temperature,
                token_weight=self.token_weight,
                codebook_weight=self.codebook_weight,
                codebook_form=self.codebook_form,
                token_reduction=self.token_reduction,
            )
            commit = _entropy.commitment(u)
            loss = self.entropy_weight * entropy + self.commitment_weight * commit
        return QuantizerOutput(
            quantized=quantized,
            indices=indices,
            loss=loss,
            token_entropy=terms["token"].detach(),
            codebook_entropy=terms[self.codebook_form].detach(),
            commitment=commit.detach(),
            batch_probs={k: v.detach() for k, v in terms.items() if k.startswith("probs")},
        )
