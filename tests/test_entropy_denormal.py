"""No subnormal number reaches any op of wetok.entropy, forward or backward (issue 15): every op's inputs and
outputs are inspected through a TorchDispatchMode, for latents whose per-bit products underflow at tau = 0.01."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wetok.entropy import CODEBOOK_FORMS, entropy_loss, entropy_terms

TAU = 0.01


class SubnormalWatch(TorchDispatchMode):
    """Records, per phase, every op that was given or returned a floating tensor holding a subnormal number."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.ops: dict[str, list[str]] = {"forward": [], "backward": []}
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.ops[self.phase].append(name)
        for where, value in (("input", (args, kwargs)), ("output", out)):
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    tiny = torch.finfo(t.dtype).tiny
                    count = int(((t != 0) & (t.abs() < tiny)).sum())
                    if count:
                        self.bad.append(f"{self.phase} {name} {where}: {count} subnormal(s)")
        return out


def latents(n: int, d: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * scale).requires_grad_()


def watched(loss_fn, u: torch.Tensor) -> SubnormalWatch:
    watch = SubnormalWatch()
    with watch:
        loss = loss_fn(u)
        watch.phase = "backward"
        loss.backward()
    return watch


def naive_joint(u: torch.Tensor) -> torch.Tensor:
    """The per-bit probability products as a direct implementation builds them (the form this module had)."""
    x = u * (4 / TAU)
    probs = torch.stack([torch.sigmoid(-x), torch.sigmoid(x)], -1)
    out = probs.new_ones(u.shape[0], 1)
    for j in range(u.shape[1]):
        out = (probs[:, j, :].unsqueeze(-1) * out.unsqueeze(-2)).flatten(-2)
    return out.sum()


CASES = [  # (positions, channels, groups, latent scale, codebook form)
    (512, 18, 1, 0.05, "joint"),  # bench_entropy's case: d = 18, g = 1, exact LFQ entropy
    (256, 16, 4, 0.05, "grouped"),
    (256, 16, 4, 0.5, "pooled"),  # saturated: |4u/tau| up to ~600
    (256, 16, 2, 0.5, "joint"),
    (64, 12, 3, 2.0, "grouped"),
]


@pytest.mark.parametrize("n,d,groups,scale,form", CASES)
def test_no_subnormal_in_any_op_forward_and_backward(n, d, groups, scale, form) -> None:
    u = latents(n, d, scale)
    # the control: the same latents do produce subnormals in a direct product of per-bit probabilities
    control = watched(naive_joint, latents(n, min(d, 12), scale))
    assert control.bad, "these latents should underflow in a direct implementation"

    watch = watched(lambda v: entropy_loss(v, groups, temperature=TAU, codebook_form=form)[0], u)
    assert watch.ops["backward"], "the backward pass was not observed"
    assert any("bmm" in op or "mm" == op for op in watch.ops["forward"] + watch.ops["backward"])
    assert watch.bad == []
    assert torch.isfinite(u.grad).all() and u.grad.abs().max() > 0


def test_all_terms_are_free_of_subnormals() -> None:
    u = latents(256, 16, 0.05, seed=3)
    watch = watched(lambda v: sum(entropy_terms(v, 4, TAU, joint=True).values()), u)
    assert watch.bad == [] and watch.ops["backward"]


def _brute_force_loss(u: torch.Tensor, groups: int, form: str) -> torch.Tensor:
    """float64: token entropy (sum over groups) minus the codebook entropy, from softmaxes over all codes."""
    n, d = u.shape
    m = d // groups

    def codes(bits: int) -> torch.Tensor:
        k = torch.arange(2**bits)
        return (((k[:, None] >> torch.arange(bits)) & 1) * 2 - 1).double()

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -torch.special.xlogy(p, p).sum(-1)

    log_q = torch.log_softmax(2 * u.reshape(n, groups, m) @ codes(m).T / TAU, dim=-1)
    token = -(log_q.exp() * log_q).sum(-1).sum(-1).mean()
    mean_q = log_q.exp().mean(0)
    if form == "grouped":
        codebook = entropy(mean_q).sum()
    elif form == "pooled":
        codebook = entropy(mean_q.mean(0))
    else:
        codebook = entropy(torch.softmax(2 * u @ codes(d).T / TAU, dim=-1).mean(0))
    return token - codebook


@pytest.mark.parametrize("form", CODEBOOK_FORMS)
@pytest.mark.parametrize("scale", [0.05, 0.5])
def test_float32_loss_and_gradient_match_float64_brute_force(form: str, scale: float) -> None:
    """Flushing changes nothing beyond float32 round-off, for latents that underflow."""
    u = latents(96, 12, scale, seed=5)
    loss, _ = entropy_loss(u, 2, temperature=TAU, codebook_form=form)
    loss.backward()
    v = u.detach().double().requires_grad_()
    ref = _brute_force_loss(v, 2, form)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert (u.grad.double() - v.grad).abs().max() <= 1e-4 * v.grad.abs().max()
