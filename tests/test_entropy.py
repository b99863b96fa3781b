"""Entropy terms of group-wise LFQ against float64 brute forces over every code, closed forms and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wetok.entropy import (
    CODEBOOK_FORMS,
    batch_distributions,
    bit_entropy,
    commitment,
    entropy_loss,
    entropy_terms,
    token_entropy,
)

TAU = 0.01


def all_codes(bits: int) -> torch.Tensor:
    """(2^bits, bits) float64 +/-1 codes; code k has bit j = +1 iff (k >> j) & 1."""
    k = torch.arange(2**bits)
    return (((k[:, None] >> torch.arange(bits)) & 1) * 2 - 1).double()


def entropy_ref(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def brute_force(u: torch.Tensor, groups: int, tau: float) -> dict[str, torch.Tensor]:
    """Every term from explicit softmaxes over all 2^d' group codes and all 2^d joint codes."""
    n, d = u.shape
    m = d // groups
    logits = 2 * u.reshape(n, groups, m) @ all_codes(m).T / tau  # (N, g, 2^d')
    log_q = torch.log_softmax(logits, dim=-1)
    q = log_q.exp()
    mean_q = q.mean(0)  # (g, 2^d')
    joint_q = torch.softmax(2 * u @ all_codes(d).T / tau, dim=-1)  # (N, 2^d)
    return {
        "token": -(q * log_q).sum(-1).sum(-1).mean(),
        "token_mean": -(q * log_q).sum(-1).mean(),
        "grouped": entropy_ref(mean_q).sum(),
        "pooled": entropy_ref(mean_q.mean(0)),
        "joint": entropy_ref(joint_q.mean(0)),
        "probs_grouped": mean_q,
        "probs_pooled": mean_q.mean(0),
        "probs_joint": joint_q.mean(0),
    }


def latents(n: int, d: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("groups", [1, 2, 4, 16])
@pytest.mark.parametrize("scale", [0.01, 0.05, 0.5], ids=["soft", "mid", "saturated"])
def test_terms_match_brute_force(groups: int, scale: float) -> None:
    u = latents(12, 16, scale, seed=groups)
    ref = brute_force(u, groups, TAU)
    terms = entropy_terms(u, groups, TAU, joint=True)
    assert set(terms) == {"token", "grouped", "pooled", "joint"}
    for key in terms:
        assert terms[key].dtype == torch.float64
        torch.testing.assert_close(terms[key], ref[key], rtol=1e-6, atol=0)
    mean_token = token_entropy(u, groups, TAU, token_reduction="mean")
    torch.testing.assert_close(mean_token, ref["token_mean"], rtol=1e-6, atol=0)
    probs = batch_distributions(u, groups, TAU, CODEBOOK_FORMS)
    for form in CODEBOOK_FORMS:
        torch.testing.assert_close(probs[form], ref[f"probs_{form}"], rtol=1e-9, atol=1e-15)


def test_four_dimensional_latents_flatten_positions() -> None:
    u4 = latents(2 * 3 * 2, 8, 0.03).reshape(2, 3, 2, 8).permute(0, 3, 1, 2)  # (B, d, h, w)
    ref = brute_force(u4.permute(0, 2, 3, 1).reshape(-1, 8), 2, TAU)
    terms = entropy_terms(u4, 2, TAU)
    for key in ("token", "grouped", "pooled", "joint"):
        torch.testing.assert_close(terms[key], ref[key], rtol=1e-10, atol=0)


def test_index_convention_matches_sign_bits() -> None:
    # One saturated position: each distribution is one-hot at the index built by hand from the signs.
    signs = torch.tensor([1, -1, -1, 1, -1, 1, 1, -1], dtype=torch.float64)
    probs = batch_distributions(signs[None] * 5.0, 2, TAU, CODEBOOK_FORMS)
    group_index = [1 + 8, 2 + 4]  # group 0 bits (1,0,0,1), group 1 bits (0,1,1,0), LSB first
    joint_index = group_index[0] + 16 * group_index[1]
    assert probs["grouped"].argmax(-1).tolist() == group_index
    assert probs["joint"].argmax().item() == joint_index
    torch.testing.assert_close(probs["joint"].max(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("groups,d", [(1, 6), (2, 6), (3, 6), (6, 6), (2, 8)])
def test_gradcheck(groups: int, d: int) -> None:
    u = latents(4, d, 0.3, seed=d + groups).requires_grad_()
    for key in ("token", "grouped", "pooled", "joint"):
        assert torch.autograd.gradcheck(lambda x, k=key: entropy_terms(x, groups, 1.0, joint=True)[k], (u,))
    # At the real temperature, with latents small enough that tau = 0.01 is well conditioned.
    v = latents(3, d, 0.004, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: entropy_terms(x, groups, TAU, joint=True)["grouped"], (v,))


def test_gradients_match_brute_force() -> None:
    u = latents(10, 8, 0.03).requires_grad_()
    v = u.detach().clone().requires_grad_()
    ours = entropy_terms(u, 2, TAU, joint=True)
    ref = brute_force(v, 2, TAU)
    for key in ("token", "grouped", "pooled", "joint"):
        (g_ours,) = torch.autograd.grad(ours[key], u, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref[key], v, retain_graph=True)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-7, atol=1e-12)


def test_g1_joint_is_lfq_codebook_entropy() -> None:
    # LFQ (MAGVIT-v2, vector-quantize-pytorch style): softmax of -||u - c||^2 / tau over all 2^d codes.
    u = latents(16, 10, 0.02)
    q = torch.softmax(-torch.cdist(u, all_codes(10)).pow(2) / TAU, dim=-1)
    lfq_codebook = entropy_ref(q.mean(0))
    lfq_sample = entropy_ref(q).mean()
    terms = entropy_terms(u, 1, TAU, joint=True)
    for form in CODEBOOK_FORMS:  # with one group all three forms are the LFQ term
        torch.testing.assert_close(terms[form], lfq_codebook, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["token"], lfq_sample, rtol=1e-6, atol=0)


def test_g_equals_d_grouped_is_bsq_factorised() -> None:
    u = latents(16, 12, 0.02)
    p = torch.sigmoid(4 * u / TAU).mean(0)  # batch mean of p(bit = +1)
    bsq = -(p * p.log() + (1 - p) * (1 - p).log()).sum()
    torch.testing.assert_close(entropy_terms(u, 12, TAU)["grouped"], bsq, rtol=1e-10, atol=0)


def test_saturated_float32_is_finite() -> None:
    u = (torch.randn(64, 16) * 3.0).requires_grad_()  # |4u/tau| up to ~4000: every sigmoid saturates
    for form in CODEBOOK_FORMS:
        loss, _ = entropy_loss(u, 4, temperature=TAU, codebook_form=form)
        (grad,) = torch.autograd.grad(loss, u)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_entropy_loss_combines_terms() -> None:
    u = latents(12, 8, 0.03)
    ref = brute_force(u, 4, TAU)
    loss, terms = entropy_loss(u, 4, temperature=TAU, token_weight=0.5, codebook_weight=2.0,
                               codebook_form="pooled", token_reduction="mean")
    torch.testing.assert_close(loss, 0.5 * ref["token_mean"] - 2.0 * ref["pooled"], rtol=1e-9, atol=0)
    torch.testing.assert_close(terms["codebook"], ref["pooled"], rtol=1e-9, atol=0)
    assert terms["pooled"] is terms["codebook"]
    torch.testing.assert_close(terms["probs_pooled"], ref["probs_pooled"], rtol=1e-9, atol=1e-15)


def test_commitment_sign_zero_is_minus_one() -> None:
    u = torch.tensor([[0.0, 0.5, -2.0, 1.25]], dtype=torch.float64, requires_grad=True)
    value = commitment(u)
    torch.testing.assert_close(value, torch.tensor((1.0 + 0.25 + 1.0 + 0.0625) / 4, dtype=torch.float64))
    value.backward()
    torch.testing.assert_close(u.grad, torch.tensor([[0.5, -0.25, -0.5, 0.125]], dtype=torch.float64))


def test_autocast_computes_in_float32() -> None:
    u = (torch.randn(32, 16) * 0.03).requires_grad_()
    ref = entropy_terms(u, 4, TAU, joint=True)
    ref_loss, _ = entropy_loss(u, 4, temperature=TAU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = entropy_terms(u, 4, TAU, joint=True)
        loss, _ = entropy_loss(u, 4, temperature=TAU)
        commit = commitment(u)
    for key, value in terms.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, ref[key])
    assert loss.dtype == commit.dtype == torch.float32
    assert torch.equal(loss, ref_loss) and torch.equal(commit, commitment(u))


def test_bad_arguments() -> None:
    u = latents(4, 8, 0.1)
    with pytest.raises(ValueError, match="groups"):
        entropy_terms(u, 3)
    with pytest.raises(ValueError, match="max_joint_bits"):
        entropy_terms(u, 2, joint=True, max_joint_bits=6)
    with pytest.raises(ValueError, match="form"):
        entropy_loss(u, 2, codebook_form="lfq")
    with pytest.raises(ValueError, match="token_reduction"):
        token_entropy(u, 2, token_reduction="max")
    assert "joint" not in entropy_terms(latents(2, 18, 0.1), 2)  # d above AUTO_JOINT_BITS


SIZES = (5, 11)  # unequal token counts per rank


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(SIZES))
    try:
        full = latents(sum(SIZES), 8, 0.03)
        start = sum(SIZES[:rank])
        local = full[start : start + SIZES[rank]].clone().requires_grad_()
        probs = batch_distributions(local, 2, TAU, CODEBOOK_FORMS)
        loss = sum(-torch.special.xlogy(p, p).sum() for p in probs.values())
        loss.backward()
        torch.save({k: v.detach() for k, v in probs.items()} | {"grad": local.grad}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process(tmp_path) -> None:
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=len(SIZES), join=True)
    full = latents(sum(SIZES), 8, 0.03).requires_grad_()
    probs = batch_distributions(full, 2, TAU, CODEBOOK_FORMS, distributed=False)
    loss = sum(-torch.special.xlogy(p, p).sum() for p in probs.values())
    (grad,) = torch.autograd.grad(loss, full)
    for rank in range(len(SIZES)):
        result = torch.load(tmp_path / f"{rank}.pt")
        for form in CODEBOOK_FORMS:
            torch.testing.assert_close(result[form], probs[form].detach(), rtol=1e-12, atol=1e-15)
        start = sum(SIZES[:rank])
        # All-reduce-sum gradient convention: each rank holds world_size x its share; DDP's mean undoes it.
        own = grad[start : start + SIZES[rank]]
        torch.testing.assert_close(result["grad"] / len(SIZES), own, rtol=1e-10, atol=1e-12)
    assert not math.isclose(  # a plain mean of the per-rank means would differ (unequal counts)
        float(entropy_ref(probs["pooled"].detach())),
        float(entropy_ref((batch_distributions(full[:5], 2, TAU, ["pooled"])["pooled"]
                           + batch_distributions(full[5:], 2, TAU, ["pooled"])["pooled"]).detach() / 2)),
        rel_tol=1e-6,
    )


def test_bit_entropy_matches_binary_entropy() -> None:
    x = torch.linspace(-15, 15, 121, dtype=torch.float64)
    p = torch.sigmoid(x)
    ref = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    torch.testing.assert_close(bit_entropy(x), ref, rtol=1e-8, atol=0)
    # Far tails, where 1 - p cancels: H(x) = e^-|x| (|x| + 1) + O(e^-2|x|).
    x = torch.tensor([-200.0, -60.0, 40.0, 300.0], dtype=torch.float64)
    torch.testing.assert_close(bit_entropy(x), (-x.abs()).exp() * (x.abs() + 1), rtol=1e-12, atol=0)
    assert bit_entropy(torch.tensor([0.0, 1e4, -1e4])).tolist() == [pytest.approx(math.log(2)), 0.0, 0.0]
