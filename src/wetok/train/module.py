"""What one training step computes: the stage-1 / stage-2 generator loss, the discriminator loss, and the
construction of the models for each stage. The engine (:mod:`wetok.train.run`) only orchestrates these."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ARCHITECTURE_FIELDS, WeTokConfig
from ..errors import InputError
from ..losses import (
    LeCamEMA,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    non_saturating_g_loss,
)
from ..model import WeTok, WeTokOutput
from .checkpoints import load_training_checkpoint, model_from_checkpoint
from .config import TrainConfig

__all__ = [
    "TrainingLoss",
    "build_discriminator",
    "build_generator",
    "load_training_checkpoint",
    "model_from_checkpoint",
    "set_stage_mode",
]


class TrainingLoss(nn.Module):
    """The official WeTok objective (spec §4) for one stage.

    Generator: ``l1_weight * mean|x - x̂| + perceptual_weight * mean LPIPS(x, x̂) + w_gan * g_loss``, plus
    ``lowpass_weight * mean|P(x) - P(x̂)|`` where P averages ``lowpass_factor`` x ``lowpass_factor`` blocks (not
    official: a colour / layout anchor for the generative decoder, off by default), plus, in
    stage 1, the quantizer's own weighted entropy + commitment loss (``out.quantizer.loss``). ``w_gan`` is
    ``gan_weight`` (0.1), or the adaptive weight when ``gan_weight`` is None. GAN terms are off before
    ``gan_start``. Discriminator: hinge + ``lecam_weight`` * LeCam with the moving averages of :class:`LeCamEMA`.
    Every term is returned detached in a dict for logging.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg.loss
        self.stage = cfg.trainer.stage
        self.perceptual = (
            PerceptualLoss(self.cfg.perceptual_net, pretrained_backbone=self.cfg.perceptual_pretrained)
            if self.cfg.perceptual_weight > 0
            else None
        )
        self.lecam = LeCamEMA(self.cfg.lecam_decay)

    def gan_active(self, step: int) -> bool:
        return step >= self.cfg.gan_start

    def generator_loss(
        self,
        images: Tensor,
        out: WeTokOutput,
        discriminator: nn.Module,
        step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total generator loss and its terms. ``discriminator`` must have its parameters frozen by the caller."""
        rec = out.reconstruction.float()
        images = images.float()
        l1 = (images - rec).abs().mean()
        nll = self.cfg.l1_weight * l1
        logs: dict[str, Tensor] = {"l1": l1.detach()}
        if self.cfg.lowpass_weight > 0:
            k = self.cfg.lowpass_factor
            lowpass = (F.avg_pool2d(images, k) - F.avg_pool2d(rec, k)).abs().mean()
            nll = nll + self.cfg.lowpass_weight * lowpass
            logs["lowpass_l1"] = lowpass.detach()
        if self.perceptual is not None:
            lp = self.perceptual(images, rec).float().mean()
            nll = nll + self.cfg.perceptual_weight * lp
            logs["lpips"] = lp.detach()
        total = nll
        q = out.quantizer
        if self.stage == 1:
            total = total + q.loss.float()
            logs["quantizer_loss"] = q.loss.detach().float()
            for name in ("token_entropy", "codebook_entropy", "commitment"):
                value = getattr(q, name)
                if value is not None:
                    logs[name] = value.detach().float()
        if self.gan_active(step):
            g_loss = non_saturating_g_loss(discriminator(rec).float())
            if self.cfg.gan_weight is None:
                if last_layer is None:
                    raise ValueError("the adaptive GAN weight needs the decoder's last layer")
                weight = adaptive_gan_weight(nll, g_loss, last_layer, scale=self.cfg.adaptive_scale)
            else:
                weight = torch.tensor(self.cfg.gan_weight, device=rec.device)
            total = total + weight * g_loss
            logs["g_loss"] = g_loss.detach()
            logs["gan_weight"] = weight.detach().float()
        logs["g_total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self, images: Tensor, reconstruction: Tensor, discriminator: nn.Module
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge + LeCam on real ``images`` and detached reconstructions (two separate D calls, as official)."""
        logits_real = discriminator(images.detach()).float()
        logits_fake = discriminator(reconstruction.detach()).float()
        hinge = hinge_d_loss(logits_real, logits_fake)
        self.lecam.update(logits_real, logits_fake)
        lecam = self.lecam.penalty(logits_real, logits_fake)
        total = hinge + self.cfg.lecam_weight * lecam
        logs = {
            "d_hinge": hinge.detach(),
            "d_lecam": lecam.detach(),
            "d_total": total.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return total, logs


def build_discriminator(cfg: TrainConfig) -> PatchDiscriminator:
    d = cfg.discriminator
    return PatchDiscriminator(ndf=d.ndf, n_layers=d.n_layers, norm=d.norm)


def _load_init(path: str) -> WeTok:
    p = Path(path)
    if p.is_dir():
        return WeTok.from_pretrained(p)
    return model_from_checkpoint(load_training_checkpoint(p), source=p)


def build_generator(cfg: TrainConfig) -> WeTok:
    """The model a fresh run starts from.

    Stage 1: ``model.init`` (warm start) or a random model of the configured architecture. Stage 2: the stage-1
    model of ``model.init`` (its EMA weights: the released model, whose tokens the stage-2 decoder must decode)
    converted with :meth:`WeTok.to_generative` (noise channels of conv_in zero, so it decodes exactly like the
    stage-1 model at initialisation), unless it already has a generative decoder. Quantizer options from
    ``model.overrides`` are applied to a loaded model.
    """
    if cfg.model.init is None:
        return WeTok(cfg.model_config())
    model = _load_init(cfg.model.init)
    training_fields = {k: v for k, v in cfg.model.overrides.items() if k not in _ARCH_FIELDS}
    arch = {k: v for k, v in cfg.model.overrides.items() if k in _ARCH_FIELDS}
    if model.config.replace(**arch) != model.config:
        raise InputError(cfg.model.init, f"model.overrides {arch} disagree with the architecture of this model")
    if training_fields:
        model = _with_config(model, model.config.replace(**training_fields))
    if cfg.trainer.stage == 2 and not model.config.generative_decoder:
        model = model.to_generative()
    return model.train()


_ARCH_FIELDS = (*ARCHITECTURE_FIELDS, "generative_decoder")  # the encoder's fields plus the decoder kind


def _with_config(model: WeTok, config: WeTokConfig) -> WeTok:
    new = WeTok(config)
    new.load_state_dict(model.state_dict())
    return new


def set_stage_mode(model: WeTok, stage: int, training: bool = True) -> WeTok:
    """Train mode for what is trained. Stage 2: encoder and quantizer frozen (no grad) and in eval mode."""
    model.train(training)
    if stage == 2:
        model.encoder.requires_grad_(False).eval()
        model.quantizer.eval()
    return model
