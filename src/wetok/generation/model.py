"""WeTok-AR: a class-conditional autoregressive transformer over WeTok's group-wise tokens (LlamaGen-style, with
the official WeTok "token factorization").

Data path, top to bottom (h x w positions, g sub-tokens each; sub-token i of a position is quantizer group i's
index):

1. The spatial sequence is [class embedding, e(0), ..., e(hw - 2)], where e(t) = sum_i emb_i(sub-token i of
   position t): the input at sequence slot t is the previous position, so slot t predicts position t.
2. A causal "spatial" transformer runs over it; its output h_t summarises the class and positions < t.
3. For each position a causal "intra-position" transformer runs over [h_t, emb_0(sub-token 0), ...,
   emb_{g-2}(sub-token g-2)]; its output j goes through the shared final RMSNorm and head j (a zero-initialised
   Linear(dim, 2^d')), so the logits of sub-token j see the class, all earlier positions and sub-tokens < j.

Blocks are pre-RMSNorm, fused-qkv causal attention with 2D RoPE, SwiGLU FFN. The RoPE table follows the official
code exactly, quirks included, because released weights depend on them: half of each head's rotary pairs encode the
row, half the column; the class slot's (cos, sin) entry is all zeros (q and k are zeroed there); the intra-position
transformer reuses the first g entries of the same table (the zero entry, then positions (0, 0), (0, 1), ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import WeTokARConfig

#: One layer's preallocated key and value buffers, each (batch, heads, max_len, head_dim) (see sampler.KVCache).
LayerCache = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------------------- RoPE
def rope_table(config: WeTokARConfig, device: torch.device | str | None = None) -> Tensor:
    """The 2D rotary table, float32 (1 + h * w, head_dim / 2, 2) of (cos, sin): entry 0 is the class slot (zeros),
    entry 1 + r * w + c is grid position (r, c). The first head_dim / 4 pairs rotate with the row, the rest with
    the column; pair k of each half has frequency base^(-4k / head_dim)."""
    quarter = config.head_dim // 4
    inv_freq = 1.0 / config.rope_base ** (torch.arange(quarter, dtype=torch.float32, device=device) * 4
                                          / config.head_dim)
    rows = torch.arange(config.grid_height, dtype=torch.float32, device=device)
    cols = torch.arange(config.grid_width, dtype=torch.float32, device=device)
    row_angles = torch.outer(rows, inv_freq)[:, None, :].expand(-1, config.grid_width, -1)
    col_angles = torch.outer(cols, inv_freq)[None, :, :].expand(config.grid_height, -1, -1)
    angles = torch.cat([row_angles, col_angles], dim=-1).flatten(0, 1)  # (h * w, head_dim / 2)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros_like(table[:1]), table])


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of ``x`` (B, L, ..., head_dim) by ``table`` (L, head_dim / 2, 2): pair
    (a, b) becomes (a cos - b sin, b cos + a sin), as a complex product.

    Computed in float32 and returned in ``x``'s dtype, so bf16 / fp16 models keep their dtype end to end."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    rotation = torch.view_as_complex(table).view(table.shape[0], *[1] * (x.dim() - 3), table.shape[1])
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


# -------------------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def attend_one(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of one query per row (B, H, 1, D) over all keys (B, H, T, D), softmax in float32.

    Plain matmuls rather than SDPA: for a single query PyTorch's CPU SDPA kernels are slower, above all in
    bfloat16 (``benchmarks/bench_sample.py --attention-only``)."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection (no biases) and RoPE on q and k."""

    def __init__(self, dim: int, n_head: int, resid_dropout: float) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, rope: Tensor, cache: LayerCache | None = None, start: int = 0) -> Tensor:
        """``x`` (B, L, dim) at sequence slots start .. start + L - 1. With ``cache``, keys and values are written
        into it at those slots and attention also sees the slots before ``start`` already there."""
        bsz, length, dim = x.shape
        qkv = self.wqkv(x).view(bsz, length, 3, self.n_head, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], rope).transpose(1, 3).unbind(2)  # each (B, heads, L, head_dim)
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:
            end = start + length
            cache[0][:, :, start:end] = k
            cache[1][:, :, start:end] = v
            k, v = cache[0][:, :, :end], cache[1][:, :, :end]
        if length == k.shape[2]:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif length == 1:  # one new slot (sampling): softmax(q k^T / sqrt(d)) v, see attend_one
            out = attend_one(q, k, v)
        else:  # a chunk after a cached prefix: slot start + i sees slots 0 .. start + i
            mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(bsz, length, dim)))


class FeedForward(nn.Module):
    """SwiGLU with dropout on its output: dropout(w2(silu(w1 x) * w3 x))."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-RMSNorm transformer block: x + attention(norm(x)), then + ffn(norm(.))."""

    def __init__(self, config: WeTokARConfig) -> None:
        super().__init__()
        assert config.ffn_hidden is not None
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config.dim, config.n_head, config.resid_dropout)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden, config.ffn_dropout)

    def forward(self, x: Tensor, rope: Tensor, cache: LayerCache | None = None, start: int = 0) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


class ClassEmbedding(nn.Module):
    """Class labels -> (B, 1, dim), with the extra null class ``num_classes``; in training mode each label is
    replaced by the null class with probability ``dropout`` (what classifier-free guidance trains on)."""

    def __init__(self, num_classes: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


# --------------------------------------------------------------------------------------------------------- model
class WeTokAR(nn.Module):
    """A class-conditional generator of WeTok token maps, built from a :class:`WeTokARConfig`.

    ``model(indices, labels)`` gives teacher-forced logits; ``model.generate(labels, ...)`` samples token maps
    (see :mod:`wetok.generation.sampler`); ``model.tokenizer`` is the paired :class:`wetok.WeTok` when one was
    loaded with the generator (official checkpoints, folders saved with a tokenizer), else None.
    """

    def __init__(self, config: WeTokARConfig) -> None:
        super().__init__()
        self.config = config
        d, g = config.dim, config.groups
        self.class_emb = ClassEmbedding(config.num_classes, d, config.class_dropout)
        self.token_emb = nn.ModuleList(nn.Embedding(config.vocab_size, d) for _ in range(g))
        self.token_drop = nn.Dropout(config.token_dropout)
        self.spatial_blocks = nn.ModuleList(Block(config) for _ in range(config.spatial_layers))
        self.intra_blocks = nn.ModuleList(Block(config) for _ in range(config.intra_layers))
        self.norm = RMSNorm(d, config.norm_eps)
        self.head = nn.ModuleList(nn.Linear(d, config.vocab_size, bias=False) for _ in range(g))
        self.tokenizer: Any = None  # a WeTok attached by the loaders; not a submodule (see __setattr__)
        self.name_or_path: str | None = None  # the name or path it was loaded from
        self._rope: dict[torch.device, Tensor] = {}
        self.reset_parameters()

    def __setattr__(self, name: str, value: Any) -> None:
        # The paired tokenizer keeps its own weights, file and dtype: it is not part of this state dict.
        if name == "tokenizer":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def reset_parameters(self) -> None:
        """The official initialisation: Linear and Embedding weights N(0, init_std), norms 1, heads 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for head in self.head:
            nn.init.zeros_(head.weight)

    # ------------------------------------------------------------------------------------------ the pieces
    def rope(self, device: torch.device) -> Tensor:
        """The float32 RoPE table on ``device`` (kept outside the state dict and out of ``.to(dtype)``)."""
        table = self._rope.get(device)
        if table is None:
            table = self._rope[device] = rope_table(self.config, device)
        return table

    def embed_position(self, tokens: Tensor) -> Tensor:
        """Sum of the g sub-token embeddings: (..., g) int64 -> (..., dim)."""
        out = self.token_emb[0](tokens[..., 0])
        for i in range(1, self.config.groups):
            out = out + self.token_emb[i](tokens[..., i])
        return out

    def spatial(self, x: Tensor, start: int = 0, caches: Sequence[LayerCache] | None = None) -> Tensor:
        """The spatial transformer on ``x`` (B, L, dim) at slots start .. start + L - 1 (slot 0 = the class)."""
        rope = self.rope(x.device)[start:start + x.shape[1]]
        for i, block in enumerate(self.spatial_blocks):
            x = block(x, rope, None if caches is None else caches[i], start)
        return x

    def intra(self, x: Tensor, start: int = 0, caches: Sequence[LayerCache] | None = None) -> Tensor:
        """The intra-position transformer on ``x`` (N, L, dim) at sub-token slots start .. start + L - 1; it
        reuses the first g entries of the spatial RoPE table (slot 0 gets the class slot's zeros)."""
        rope = self.rope(x.device)[start:start + x.shape[1]]
        for i, block in enumerate(self.intra_blocks):
            x = block(x, rope, None if caches is None else caches[i], start)
        return x

    def head_logits(self, x: Tensor, sub_token: int) -> Tensor:
        """Final norm and head ``sub_token``: (..., dim) -> (..., 2^d')."""
        return self.head[sub_token](self.norm(x))

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, indices: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits (B, h, w, g, 2^d') for token maps ``indices`` int64 (B, h, w, g) of classes
        ``labels`` (B,): entry (r, c, i) predicts sub-token i at (r, c) from the class, the positions before
        (r, c) in row-major order and sub-tokens < i of (r, c). In training mode labels are dropped to the null
        class with probability ``class_dropout``."""
        cfg = self.config
        expected = (cfg.grid_height, cfg.grid_width, cfg.groups)
        if indices.dim() != 4 or tuple(indices.shape[1:]) != expected:
            raise ValueError(f"indices must be (B, {', '.join(map(str, expected))}), got {tuple(indices.shape)}")
        bsz, n, g = indices.shape[0], cfg.num_positions, cfg.groups
        tokens = indices.reshape(bsz, n, g)
        x = torch.cat([self.class_emb(labels), self.embed_position(tokens[:, :-1])], dim=1)
        h = self.spatial(self.token_drop(x))
        sub = [self.token_emb[i](tokens[..., i]) for i in range(g - 1)]
        ctx = torch.stack([h, *sub], dim=2).reshape(bsz * n, g, cfg.dim)
        out = self.intra(ctx).view(bsz, n, g, cfg.dim)
        logits = torch.stack([self.head_logits(out[:, :, i], i) for i in range(g)], dim=2)
        return logits.view(bsz, cfg.grid_height, cfg.grid_width, g, cfg.vocab_size)

    def loss(self, indices: Tensor, labels: Tensor) -> Tensor:
        """The official training loss: the sum over sub-tokens of the mean cross-entropy (float32)."""
        logits = self(indices, labels).float()
        return sum(
            F.cross_entropy(logits[..., i, :].reshape(-1, self.config.vocab_size), indices[..., i].reshape(-1))
            for i in range(self.config.groups)
        )  # type: ignore[return-value]

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor | Sequence[int],
        cfg_scale: float | Sequence[float] = 1.0,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Sample token maps int64 (B, h, w, g) for class ``labels`` (B,); ``cfg_scale`` and the filters take one
        value or one per sub-token. Keyword options (``compile``, ``progress``, ``return_logits``) and the details
        are those of :func:`wetok.generation.sampler.generate`."""
        from .sampler import generate

        return generate(self, labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=generator, **kwargs)

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> WeTokAR:
        """A randomly initialised model with a registered configuration (``list_ar_presets()``), e.g.
        ``WeTokAR.from_preset("ar-small", grid_height=4, grid_width=4)``."""
        from .config import get_ar_config

        return cls(get_ar_config(name, **overrides))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> WeTokAR:
        """The trained generator of a registered name (``cifar10-ar``; see ``wetok info``), a folder or a Hub id:
        ``config.json`` + ``model.safetensors``, and ``tokenizer/`` into ``.tokenizer`` when present."""
        from .pretrained import load_pretrained_ar

        return load_pretrained_ar(name_or_path, **kwargs)

    @classmethod
    def from_official(cls, ckpt: str | Path, config: str | Path | WeTokARConfig, **kwargs: Any) -> WeTokAR:
        """Load an official AR Lightning ``.ckpt`` with its GenStage YAML (see :mod:`wetok.generation.official`)."""
        from .official import load_official_ar

        return load_official_ar(ckpt, config, **kwargs)

    def save_pretrained(self, directory: str | Path, *, tokenizer: bool = True) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (and the tokenizer into ``tokenizer/`` if attached and
        ``tokenizer``) into ``directory``."""
        from .pretrained import save_pretrained_ar

        return save_pretrained_ar(self, directory, tokenizer=tokenizer)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
