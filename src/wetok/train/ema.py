"""Exponential moving average of a model's trained weights: what validation and export use (spec §2.3)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """A frozen copy of ``model`` whose trainable parameters follow
    ``shadow <- shadow - (1 - decay) * (shadow - param)`` after every :meth:`update` (official: decay 0.999, no
    warm-up; see :meth:`current_decay`).

    The copy is a whole model (``ema.module``), so it can be evaluated or saved directly. Parameters that do not
    require grad in the live model (the frozen encoder of stage 2) are copied, not averaged, so the EMA model is
    always complete (the official stage-2 EMA lacks the encoder). Buffers are copied. Unlike the official LitEma
    the discriminator is not averaged: nothing uses its average.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def current_decay(self) -> float:
        """``decay``, or with warm-up ``min(decay, (1 + n) / (10 + n))`` after n updates (LitEma's optional form,
        off in the official recipes): useful for short runs, where a 0.999 average would still be mostly the
        initial weights."""
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        state_dict.setdefault(prefix + "num_updates", torch.zeros((), dtype=torch.int64))  # older checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> EMA:
        """The averaged model always stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (same architecture as the copy) into the average."""
        decay = self.current_decay()
        self.num_updates += 1
        shadow = dict(self.module.named_parameters())
        averaged, targets, copied, sources = [], [], [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                averaged.append(shadow[name])
                targets.append(param.detach().to(shadow[name].dtype))
            else:
                copied.append(shadow[name])
                sources.append(param.detach())
        if averaged:
            # shadow - (1 - decay) * (shadow - param) == lerp(shadow, param, 1 - decay)
            torch._foreach_lerp_(averaged, targets, 1.0 - decay)
        for dst, src in zip(copied, sources, strict=True):
            dst.copy_(src)
        own = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            if name in own:
                own[name].copy_(buf)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Reset the average to the current weights of ``model``."""
        self.module.load_state_dict(model.state_dict())
