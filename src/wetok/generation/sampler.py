"""Sampling token maps from a :class:`WeTokAR`: static KV caches, a prefill + one-step loop, and guidance /
temperature / top-k / top-p as plain functions of the logits.

The loop, per position t (row-major): one step of the spatial transformer (its keys and values go into a
preallocated cache sized for the whole map), then g steps of the intra-position transformer (a second preallocated
cache of length g, overwritten from slot 0 at every position), each followed by head i, guidance and a draw.
Conditional and unconditional (null-class) rows run as one batch; the drawn sub-token is fed to both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import WeTokAR


# -------------------------------------------------------------------------------------------------------- caches
class KVCache:
    """Preallocated keys and values of every layer of one transformer for one batch: two tensors
    (layers, batch, heads, length, head_dim). Created for a ``generate`` call and dropped after it;
    ``layers[i]`` is the (keys, values) pair that block i writes into."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, batch, heads, length, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # only written slots are ever read
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.layers = [(self.keys[i], self.values[i]) for i in range(layers)]

    @classmethod
    def spatial(cls, model: WeTokAR, batch: int) -> KVCache:
        """A cache for the spatial transformer: one slot per position (the class slot included)."""
        cfg, p = model.config, model.norm.weight
        return cls(cfg.spatial_layers, batch, cfg.n_head, cfg.num_positions, cfg.head_dim,
                   dtype=p.dtype, device=p.device)

    @classmethod
    def intra(cls, model: WeTokAR, batch: int) -> KVCache:
        """A cache for the intra-position transformer: one slot per sub-token, reused at every position."""
        cfg, p = model.config, model.norm.weight
        return cls(cfg.intra_layers, batch, cfg.n_head, cfg.groups, cfg.head_dim, dtype=p.dtype, device=p.device)


# ---------------------------------------------------------------------------------------- functions of logits
def guide(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: u + s (c - u). s = 1 gives the conditional logits, s = 0 the unconditional."""
    return uncond + scale * (cond - uncond)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept); k <= 0: off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely values whose probabilities sum to at least ``p``
    (the most likely value is always kept), set the rest to -inf; p >= 1: off."""
    if p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError("top_p must be in (0, 1]")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the values ranked above each one
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of ``logits`` (N, V) -> int64 (N,). ``top_k=1`` (or ``temperature=0``) is greedy: the
    arg-max, without touching the generator."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if top_k == 1 or temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class SamplingSettings:
    """Guidance scale and filters, one entry per sub-token."""

    cfg_scale: tuple[float, ...]
    temperature: tuple[float, ...]
    top_k: tuple[int, ...]
    top_p: tuple[float, ...]

    @classmethod
    def build(cls, groups: int, cfg_scale: Any, temperature: Any, top_k: Any, top_p: Any) -> SamplingSettings:
        """Each argument: one value for every sub-token, or a sequence of ``groups`` values."""
        def per(value: Any, name: str, kind: type) -> tuple[Any, ...]:
            if isinstance(value, Tensor):
                value = value.tolist()
            if isinstance(value, (list, tuple)):
                if len(value) != groups:
                    raise ValueError(f"{name} has {len(value)} values; the model has {groups} sub-tokens per "
                                     "position")
                return tuple(kind(v) for v in value)
            return (kind(value),) * groups

        settings = cls(per(cfg_scale, "cfg_scale", float), per(temperature, "temperature", float),
                       per(top_k, "top_k", int), per(top_p, "top_p", float))
        if not all(math.isfinite(s) for s in settings.cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {settings.cfg_scale}")
        if not all(0 <= t < math.inf for t in settings.temperature):
            raise ValueError(f"temperature must be finite and >= 0, got {settings.temperature}")
        if not all(k >= 0 for k in settings.top_k):
            raise ValueError(f"top_k must be >= 0 (0: off), got {settings.top_k}")
        if not all(0 < p <= 1 for p in settings.top_p):
            raise ValueError(f"top_p must be in (0, 1], got {settings.top_p}")
        return settings

    @property
    def guided(self) -> bool:
        """Whether the unconditional rows are needed (any scale differs from 1)."""
        return any(s != 1.0 for s in self.cfg_scale)

    def draw(self, logits: Tensor, sub_token: int, generator: torch.Generator | None) -> Tensor:
        """Guide (when guided, ``logits`` holds the conditional rows, then the unconditional ones) and draw."""
        if self.guided:
            half = logits.shape[0] // 2
            logits = guide(logits[:half], logits[half:], self.cfg_scale[sub_token])
        return sample_logits(logits, temperature=self.temperature[sub_token], top_k=self.top_k[sub_token],
                             top_p=self.top_p[sub_token], generator=generator)


def _steps(model: WeTokAR, compile: bool) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """The one-position step of the spatial transformer and the one-sub-token step of the intra-position
    transformer (with its head), optionally compiled (once per model)."""
    def spatial_step(x: Tensor, start: int, caches: list) -> Tensor:
        return model.spatial(x, start, caches)

    def intra_step(x: Tensor, start: int, caches: list) -> Tensor:
        return model.head_logits(model.intra(x, start, caches), start).float()

    if not compile:
        return spatial_step, intra_step
    model.rope(model.norm.weight.device)  # build the RoPE table outside the graphs (no recompile for it)
    compiled = model.__dict__.get("_compiled_steps")
    if compiled is None:
        compiled = (torch.compile(spatial_step, dynamic=True), torch.compile(intra_step))
        model.__dict__["_compiled_steps"] = compiled
    return compiled


@torch.no_grad()
def generate(
    model: WeTokAR,
    labels: Tensor | Sequence[int],
    *,
    cfg_scale: float | Sequence[float] = 1.0,
    temperature: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    generator: torch.Generator | None = None,
    compile: bool = False,
    progress: bool = False,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample token maps int64 (B, h, w, g) for class ``labels`` (B,) (the null class ``num_classes`` gives
    unconditional samples).

    ``cfg_scale``, ``temperature``, ``top_k`` and ``top_p`` take one value or one per sub-token. Guidance
    (logits = u + s (c - u), u from the null class) runs when any scale differs from 1; scales below, at and above
    1 may be mixed. ``top_k=1`` is greedy. ``generator`` (on the model's device) makes draws reproducible.
    ``compile`` runs the two step functions through ``torch.compile`` (compiled once per model). The model runs in
    eval mode and in its own dtype; logits are guided and sampled in float32. ``return_logits`` also returns the
    float32 logits the sampler saw before guidance, (rows, h, w, g, 2^d'), the conditional rows first and, with
    guidance, the unconditional rows after them.
    """
    cfg = model.config
    g, n = cfg.groups, cfg.num_positions
    device = model.norm.weight.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > cfg.num_classes):
        raise ValueError(f"labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = the null class)")
    settings = SamplingSettings.build(g, cfg_scale, temperature, top_k, top_p)
    if labels.numel() == 0:
        empty = torch.empty(0, cfg.grid_height, cfg.grid_width, g, dtype=torch.long, device=device)
        return (empty, torch.empty(0, *empty.shape[1:], cfg.vocab_size, device=device)) if return_logits else empty
    copies = 2 if settings.guided else 1  # conditional rows, then unconditional rows: one batch
    rows = torch.cat([labels, torch.full_like(labels, cfg.null_class)]) if settings.guided else labels
    spatial_step, intra_step = _steps(model, compile)
    was_training = model.training
    model.eval()
    try:
        spatial_cache, intra_cache = KVCache.spatial(model, rows.numel()), KVCache.intra(model, rows.numel())
        out = torch.empty(labels.numel(), n, g, dtype=torch.long, device=device)
        seen = torch.empty(rows.numel(), n, g, cfg.vocab_size, device=device) if return_logits else None
        x = model.class_emb(rows)  # prefill: the class slot
        positions = range(n)
        if progress:
            from tqdm.auto import tqdm

            positions = tqdm(positions, desc="positions", leave=False)
        for t in positions:
            sub_input = spatial_step(x, t, spatial_cache.layers)  # h_t, slot 0 of the intra-position sequence
            for i in range(g):
                logits = intra_step(sub_input, i, intra_cache.layers)[:, 0]
                if seen is not None:
                    seen[:, t, i] = logits
                token = out[:, t, i] = settings.draw(logits, i, generator)
                if i < g - 1:
                    sub_input = model.token_emb[i](token.repeat(copies))[:, None]
            if t < n - 1:
                x = model.embed_position(out[:, t].repeat(copies, 1))[:, None]
    finally:
        model.train(was_training)
    indices = out.view(labels.numel(), cfg.grid_height, cfg.grid_width, g)
    if seen is not None:
        return indices, seen.view(rows.numel(), cfg.grid_height, cfg.grid_width, g, cfg.vocab_size)
    return indices
