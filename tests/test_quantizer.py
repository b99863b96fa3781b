import itertools

import pytest
import torch

from wetok.quantizer import (
    GroupQuantizer,
    bits_to_indices,
    codes_to_indices,
    from_official_flat,
    indices_to_bits,
    indices_to_codes,
    sign_quantize,
    to_official_flat,
)


def brute_force_indices(latents: torch.Tensor, groups: int) -> torch.Tensor:
    """Index of every (b, h, w, group) by a Python loop: sum_j [channel g*d'+j > 0] * 2^j."""
    b, d, h, w = latents.shape
    dp = d // groups
    out = torch.zeros(b, h, w, groups, dtype=torch.int64)
    for bb, hh, ww, g in itertools.product(range(b), range(h), range(w), range(groups)):
        out[bb, hh, ww, g] = sum(int(latents[bb, g * dp + j, hh, ww] > 0) << j for j in range(dp))
    return out


def test_sign_quantize_values_zero_and_straight_through():
    u = torch.tensor([-2.0, -0.0, 0.0, 1e-9, 3.0], requires_grad=True)
    q = sign_quantize(u)
    assert q.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0]
    q.sum().backward()
    assert u.grad.tolist() == [1.0] * 5


@pytest.mark.parametrize("groups,d", [(1, 8), (2, 8), (4, 16), (16, 16), (3, 12)])
def test_indices_match_brute_force_and_round_trip(groups, d):
    g = torch.Generator().manual_seed(groups * 100 + d)
    latents = torch.randn(2, d, 3, 5, generator=g)
    latents[0, 0, 0, 0] = 0.0  # exactly zero counts as -1 / bit 0
    indices = codes_to_indices(latents, groups)
    assert indices.shape == (2, 3, 5, groups) and indices.dtype == torch.int64
    assert torch.equal(indices, brute_force_indices(latents, groups))
    codes = indices_to_codes(indices, d // groups)
    assert torch.equal(codes, torch.where(latents > 0, 1.0, -1.0))
    assert torch.equal(codes_to_indices(codes, groups), indices)
    bits = indices_to_bits(indices, d // groups)
    assert torch.equal(bits_to_indices(bits), indices)


def test_codebook_rows_are_lsb_first():
    codes = indices_to_codes(torch.tensor([1, 128]).reshape(2, 1, 1, 1), 8)[:, :, 0, 0]
    assert codes[0].tolist() == [1.0] + [-1.0] * 7
    assert codes[1].tolist() == [-1.0] * 7 + [1.0]


def test_official_flat_layout_group_fastest():
    # spec §3.2: channel 8 set at position (h=1, w=0) of a G=2 model (d'=8, W=3) gives flat[1*3*2 + 0*2 + 1] = 1
    latents = -torch.ones(1, 16, 2, 3)
    latents[0, 8, 1, 0] = 1.0
    flat = to_official_flat(codes_to_indices(latents, 2))
    expected = torch.zeros(12, dtype=torch.int64)
    expected[1 * 3 * 2 + 0 * 2 + 1] = 1
    assert torch.equal(flat, expected)
    assert torch.equal(from_official_flat(flat, 1, 2, 3, 2), codes_to_indices(latents, 2))


def test_indices_out_of_range_rejected():
    with pytest.raises(ValueError):
        indices_to_codes(torch.tensor([16]).reshape(1, 1, 1, 1), 4)


def _brute_force_loss(u: torch.Tensor, groups: int, tau: float, token_w, codebook_w, entropy_w, commit_w):
    """Float64 brute force: explicit 2^d' code matrix, softmax of 2<u,c>/tau, paper Eq. 6/8 (sum over groups)."""
    b, d, h, w = u.shape
    dp = d // groups
    flat = u.permute(0, 2, 3, 1).reshape(-1, groups, dp).double()
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=dp)), dtype=torch.float64).flip(-1)
    p = torch.softmax(2 * flat @ codes.T / tau, dim=-1)  # (N, g, 2^d')
    token = -(p * p.log()).sum(-1).sum(-1).mean()
    avg = p.mean(0)
    codebook = -(avg * avg.log()).sum(-1).sum()
    commit = ((u.double() - torch.where(u > 0, 1.0, -1.0).double()) ** 2).mean()
    return entropy_w * (token_w * token - codebook_w * codebook) + commit_w * commit


def test_quantizer_training_loss_matches_brute_force_and_eval_is_zero():
    g = torch.Generator().manual_seed(0)
    u = (torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64) * 0.02)
    q = GroupQuantizer(groups=2, bits_per_group=4, temperature=0.01, commitment_weight=0.25, entropy_weight=0.1)
    out = q.train()(u)
    expected = _brute_force_loss(u, 2, 0.01, 1.0, 1.0, 0.1, 0.25)
    assert torch.allclose(out.loss, expected, rtol=1e-9, atol=0)
    assert out.indices.shape == (2, 3, 3, 2)
    q.eval()
    assert q(u).loss.item() == 0.0


def test_quantizer_loss_is_float32_under_autocast():
    u = (torch.randn(2, 8, 2, 2) * 0.02).bfloat16()
    q = GroupQuantizer(groups=2, bits_per_group=4).train()
    ref = q(u.float()).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(u)
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss, ref, rtol=1e-5)
