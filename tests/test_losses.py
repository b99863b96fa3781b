"""Loss terms against their formulas, computed by hand (Python floats / float64) on small inputs."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from wetok.losses import (
    GlobalBatchNorm2d,
    LeCamEMA,
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    lecam_penalty,
    non_saturating_g_loss,
)


def test_hinge_d_loss_by_hand():
    real = torch.tensor([[[[0.5, 2.0], [-1.0, 1.0]]]])  # relu(1 - r): 0.5, 0, 2, 0 -> mean 0.625
    fake = torch.tensor([[[[-3.0, 0.0], [0.25, -0.5]]]])  # relu(1 + f): 0, 1, 1.25, 0.5 -> mean 0.6875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.6875), abs=1e-7)


def test_generator_loss_averages_patches_before_softplus():
    fake = torch.tensor([[[[1.0, 3.0]]], [[[-2.0, 0.0]]]])  # per-image patch means: 2.0, -1.0
    expected = 0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0)))
    assert non_saturating_g_loss(fake).item() == pytest.approx(expected, abs=1e-6)
    # not the mean of per-patch softplus values
    per_patch = sum(math.log1p(math.exp(-v)) for v in (1.0, 3.0, -2.0, 0.0)) / 4
    assert abs(non_saturating_g_loss(fake).item() - per_patch) > 1e-2


def test_lecam_penalty_and_ema_by_hand():
    real = torch.tensor([0.5, -0.5, 2.0, 1.0])  # mean 0.75
    fake = torch.tensor([-1.0, 0.5, 0.0, -1.5])  # mean -0.5
    ema = LeCamEMA(decay=0.9)
    ema.update(real, fake)
    assert ema.ema_real.item() == pytest.approx(0.1 * 0.75)
    assert ema.ema_fake.item() == pytest.approx(0.1 * -0.5)
    ema.update(real, fake)
    r_bar, f_bar = 0.9 * 0.075 + 0.075, 0.9 * -0.05 - 0.05
    assert ema.ema_real.item() == pytest.approx(r_bar)
    assert ema.ema_fake.item() == pytest.approx(f_bar)
    expected = sum(max(r - f_bar, 0.0) ** 2 for r in real.tolist()) / 4
    expected += sum(max(r_bar - f, 0.0) ** 2 for f in fake.tolist()) / 4
    assert ema.penalty(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert lecam_penalty(real, fake, torch.tensor(r_bar), torch.tensor(f_bar)).item() == pytest.approx(expected)
    # the averages are buffers: they travel in the state dict (checkpointed)
    state = ema.state_dict()
    restored = LeCamEMA(decay=0.9)
    restored.load_state_dict(state)
    assert restored.ema_real.item() == pytest.approx(r_bar)


def test_adaptive_weight_closed_form():
    # nll = <a, w>, g = <b, w>: gradients a and b, weight = scale * |a| / (|b| + eps)
    w = torch.zeros(2, 2, requires_grad=True)
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # |a| = 5
    b = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # |b| = 1
    nll, g = (a * w).sum(), (b * w).sum()
    weight = adaptive_gan_weight(nll, g, w, scale=0.8, eps=1e-4)
    assert weight.item() == pytest.approx(0.8 * 5.0 / (1.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    # clamp at max_weight
    g0 = (torch.zeros(2, 2) * w).sum()
    assert adaptive_gan_weight(nll, g0, w, scale=1.0, max_weight=1e4).item() == pytest.approx(1e4)


def test_discriminator_matches_official_layout_and_init():
    torch.manual_seed(0)
    d = PatchDiscriminator()  # ndf 64, 3 layers, BatchNorm
    assert sum(p.numel() for p in d.parameters()) == 2_765_633  # spec §1.2
    keys = {k.rsplit(".", 1)[0] for k in d.state_dict()}
    assert keys == {f"main.{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11)}
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    big = convs[3].weight  # 256 -> 512, 2M weights
    assert big.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert big.std().item() == pytest.approx(0.02, rel=0.01)
    bns = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_w = torch.cat([m.weight for m in bns])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=4e-3)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(m.bias.abs().max().item() == 0 for m in bns)
    # 256x256 gives 30x30 logits (spec §4.4); 64x64 gives 6x6: 64 -> 32 -> 16 -> 8 -> 7 -> 6
    assert PatchDiscriminator(ndf=8)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_discriminator_forward_equals_float64_reference():
    torch.manual_seed(1)
    d = PatchDiscriminator(ndf=8, n_layers=2).train()
    x = torch.randn(3, 3, 32, 32)
    out = d(x)
    h = x.double()
    for m in d.main:
        if isinstance(m, torch.nn.Conv2d):
            b = None if m.bias is None else m.bias.double()
            h = F.conv2d(h, m.weight.double(), b, stride=m.stride, padding=m.padding)
        elif isinstance(m, torch.nn.BatchNorm2d):
            mu = h.mean(dim=(0, 2, 3), keepdim=True)
            var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            h = (h - mu) / torch.sqrt(var + m.eps) * m.weight.double()[:, None, None] + m.bias.double()[:, None, None]
        else:
            h = torch.where(h > 0, h, 0.2 * h)
    torch.testing.assert_close(out.double(), h, atol=1e-5, rtol=1e-4)


def test_global_batchnorm_single_process_equals_batchnorm():
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(4)
    ref.weight.data.normal_(1, 0.5)
    ref.bias.data.normal_()
    gbn = GlobalBatchNorm2d(4)
    gbn.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    y_ref, y = ref(x), gbn(x)  # one process: plain BatchNorm path
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gbn.running_var, ref.running_var)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gbn_worker(rank: int, world: int, port: int, x: torch.Tensor, state: dict, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    bn = GlobalBatchNorm2d(4)
    bn.load_state_dict(state)
    xs = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn(xs)
    # loss = mean over the global batch, split into per-process means averaged like DDP does
    ((y * torch.arange(1.0, 5.0)[None, :, None, None]).pow(2).mean() / world).backward()
    grads = torch.stack([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)
    out[rank] = (y.detach(), xs.grad, grads, bn.running_mean.clone(), bn.running_var.clone())
    dist.destroy_process_group()


def test_global_batchnorm_two_processes_equals_one_big_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 3) * 2 + 1
    ref = torch.nn.BatchNorm2d(4)
    ref.weight.data.normal_(1, 0.5)
    ref.bias.data.normal_()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr)
    (y_ref * torch.arange(1.0, 5.0)[None, :, None, None]).pow(2).mean().backward()

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gbn_worker, args=(2, _free_port(), x, state, out), nprocs=2, join=True)
    y = torch.cat([out[0][0], out[1][0]])
    torch.testing.assert_close(y, y_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), xr.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[0][2], torch.stack([ref.weight.grad, ref.bias.grad]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1][3], ref.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1][4], ref.running_var, atol=1e-6, rtol=1e-5)


def test_perceptual_loss_matches_lpips_formula_and_stays_frozen():
    torch.manual_seed(0)
    loss = PerceptualLoss(pretrained_backbone=False)
    loss.train()  # must not switch LPIPS' dropout on
    assert not loss.lpips.training
    assert not any(p.requires_grad for p in loss.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d = loss(x, y)
    assert d.shape == (2,)
    torch.testing.assert_close(d, loss(x, y))  # deterministic: dropout off
    # float64 reference from the LPIPS definition: scaled input -> VGG slices -> unit-normalise channels ->
    # squared difference -> 1x1 linear (package weights) -> spatial mean -> sum over the 5 layers
    net = loss.lpips
    shift = torch.tensor([-0.030, -0.088, -0.188]).double()[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450]).double()[None, :, None, None]
    vgg = net.net.double()
    fx = vgg((x.double() - shift) / scale)
    fy = vgg((y.detach().double() - shift) / scale)
    total = torch.zeros(2, dtype=torch.float64)
    for k, (a, b) in enumerate(zip(fx, fy, strict=True)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = getattr(net, f"lin{k}").model[1].weight.double()
        total += ((a - b).pow(2) * w.reshape(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    vgg.float()
    torch.testing.assert_close(d.double(), total, atol=1e-5, rtol=1e-4)
    # linear-layer weights are the package's v0.1 VGG file (the same as the official vgg.pth, spec §4.5)
    assert net.lin0.model[1].weight.sum().item() == pytest.approx(6.93, abs=0.01)
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
