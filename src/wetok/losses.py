"""Training losses: LPIPS, the PatchGAN discriminator, GAN / hinge / LeCam terms and the adaptive GAN weight.

The formulas follow the official WeTok training (a VQGAN-style loss, spec §4):

* generator (stage 1): ``|x - x̂| + w_p * LPIPS(x, x̂) + w_g * softplus(-mean_patches D(x̂))`` plus the quantizer's
  own entropy + commitment terms (computed by :mod:`wetok.quantizer`);
* discriminator: hinge ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))`` plus ``w_lecam * LeCam``.

The LeCam moving averages live in :class:`LeCamEMA`, a module with registered buffers, so they are checkpointed
with the discriminator and averaged over processes (the official code keeps them as Python floats on each GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._distributed import is_distributed
from .errors import InputError

__all__ = [
    "PerceptualLoss",
    "PatchDiscriminator",
    "GlobalBatchNorm2d",
    "LeCamEMA",
    "hinge_d_loss",
    "non_saturating_g_loss",
    "lecam_penalty",
    "adaptive_gan_weight",
]


# --------------------------------------------------------------------------------------------------------------
# LPIPS


class PerceptualLoss(nn.Module):
    """LPIPS distance through the ``lpips`` package, frozen and always in eval mode.

    ``lpips.LPIPS(net="vgg")`` is the same network as the official loss (torchvision VGG16 features cut after
    relu1_2 ... relu5_3, the same input scaling and the same linear-layer weights, which ship inside the package).
    The VGG16 backbone itself is torchvision's ImageNet checkpoint, downloaded once into the torch hub cache; with
    ``pretrained_backbone=False`` the backbone keeps a random initialisation (for tests and offline machines).

    ``forward(x, y)`` takes images in [-1, 1], shape (B, 3, H, W), and returns one distance per image, shape (B,).
    """

    def __init__(self, net: str = "vgg", *, pretrained_backbone: bool = True) -> None:
        super().__init__()
        from .metrics import build_lpips

        try:
            self.lpips = build_lpips(net, pretrained=True, pretrained_backbone=pretrained_backbone)
        except InputError as err:  # the backbone's weights are missing and could not be downloaded
            raise InputError(err.path, f"{err.reason}; or set loss.perceptual_pretrained=false to train on random "
                             "backbone features") from err

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stay in eval mode whatever the parent does (LPIPS' dropout layers must stay off)."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.lpips(x, y).reshape(x.shape[0])


# --------------------------------------------------------------------------------------------------------------
# Discriminator


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all processes (any backend, CPU included).

    Hand-written because ``torch.nn.SyncBatchNorm`` refuses CPU tensors (gloo); with one process it equals
    ``nn.BatchNorm2d``. Gradients flow through the all-reduce (the autograd all-reduce of :mod:`wetok.entropy`),
    so training with N processes matches one process that sees the concatenated batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from .entropy import all_reduce_sum as all_reduce

        count = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


_NORMS = ("batch", "sync_batch", "none")


class PatchDiscriminator(nn.Module):
    """The pix2pix PatchGAN discriminator of the official loss (spec §4.4).

    Layers (``main``, indices as in the official state dict): conv 4x4 s2 (bias) + LeakyReLU(0.2), then
    ``n_layers - 1`` blocks of conv 4x4 s2 (no bias) + norm + LeakyReLU with widths ndf * min(2^n, 8), one more
    such block with stride 1, and a final conv 4x4 s1 to one logit per patch. A 256x256 image gives 30x30 logits.

    ``norm``: ``"batch"`` (official: statistics of each process's own batch), ``"sync_batch"`` (statistics of the
    global batch across processes: ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm2d` elsewhere) or
    ``"none"``. Init: conv weights N(0, 0.02), norm weights N(1, 0.02), norm biases 0.
    """

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"discriminator norm must be one of {_NORMS}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.norm = norm
        use_bias = norm == "none"

        def norm_layer(channels: int) -> nn.Module:
            if norm == "none":
                return nn.Identity()
            return (GlobalBatchNorm2d if norm == "sync_batch" else nn.BatchNorm2d)(channels)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            new_width = ndf * min(2**n, 8)
            layers += [
                nn.Conv2d(width, new_width, 4, stride, 1, bias=use_bias),
                norm_layer(new_width),
                nn.LeakyReLU(0.2, True),
            ]
            width = new_width
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Official init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02, generator=generator)
                m.bias.zero_()

    def convert_sync_batchnorm(self) -> PatchDiscriminator:
        """With ``norm="sync_batch"`` on CUDA, swap in ``torch.nn.SyncBatchNorm`` (fused kernels); returns self."""
        if self.norm == "sync_batch":
            for i, m in enumerate(self.main):
                if isinstance(m, GlobalBatchNorm2d):
                    sync = nn.SyncBatchNorm(m.num_features, m.eps, m.momentum).to(m.weight.device)
                    sync.load_state_dict(m.state_dict())
                    self.main[i] = sync
        return self

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, 1, h, w) patch logits."""
        return self.main(x)


# --------------------------------------------------------------------------------------------------------------
# GAN terms


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))``, means over all logits."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss: mean over images of ``softplus(-mean_patches D(x̂))``.

    The patch logits of each image are averaged *before* the softplus, as in the official loss.
    """
    per_image = logits_fake.reshape(logits_fake.shape[0], -1).mean(dim=1)
    return F.softplus(-per_image).mean()


def lecam_penalty(logits_real: Tensor, logits_fake: Tensor, ema_real: Tensor, ema_fake: Tensor) -> Tensor:
    """LeCam regulariser ``mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(x̂))^2`` (Tseng et al. 2021)."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


class LeCamEMA(nn.Module):
    """Moving averages of the discriminator's mean logits on real and fake images, for :func:`lecam_penalty`.

    Both start at 0 and follow ``ema <- decay * ema + (1 - decay) * batch_mean``. They are buffers (so they are
    checkpointed), and with torch.distributed initialised the batch means are averaged over processes before the
    update, so every process holds the same values (the mean of equal-sized local batch means is the global mean).
    """

    ema_real: Tensor
    ema_fake: Tensor

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = float(decay)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """Fold this batch's mean logits into the averages (call before :meth:`penalty`, as the official code)."""
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        if is_distributed():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        self.ema_real.mul_(self.decay).add_((1.0 - self.decay) * means[0])
        self.ema_fake.mul_(self.decay).add_((1.0 - self.decay) * means[1])

    def penalty(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """:func:`lecam_penalty` against the current averages."""
        return lecam_penalty(logits_real, logits_fake, self.ema_real, self.ema_fake)


def adaptive_gan_weight(
    nll_loss: Tensor,
    g_loss: Tensor,
    last_layer: Tensor,
    *,
    scale: float = 0.8,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> Tensor:
    """VQGAN's adaptive GAN weight ``scale * clamp(|grad nll| / (|grad g| + eps), 0, max_weight)`` (detached).

    Gradients are taken with respect to ``last_layer`` (the decoder's ``conv_out.weight``); both losses must still
    have their graphs (they are kept with ``retain_graph=True``). Under DDP each process uses its own gradients, as
    in the official code, so the weight is a per-process quantity.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + eps)
    return (weight.clamp(0.0, max_weight) * scale).detach()
