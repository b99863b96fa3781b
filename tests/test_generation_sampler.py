"""The cached sampler against the uncached forward, guidance, filtering against brute force, reproducibility,
bf16 and the compiled path."""

import numpy as np
import pytest
import torch

from test_generation_model import tiny
from wetok.generation import guide, sample_logits, top_k_filter, top_p_filter
from wetok.generation.sampler import KVCache


def null_labels(model, labels):
    return torch.full_like(labels, model.config.null_class)


@pytest.mark.parametrize("scales", [[0.5, 1.0, 2.5], [1.0, 1.0, 1.0]])
def test_cached_generation_equals_uncached_forward(scales):
    """Logits seen while sampling (KV caches, one position at a time) = the teacher-forced forward of the
    finished maps, for the conditional and the unconditional rows."""
    model = tiny()
    labels = torch.tensor([0, 2, 1])
    gen = torch.Generator().manual_seed(3)
    indices, seen = model.generate(labels, cfg_scale=scales, top_k=0, generator=gen, return_logits=True)
    guided = any(s != 1.0 for s in scales)
    assert seen.shape[0] == (6 if guided else 3)
    with torch.no_grad():
        assert (model(indices, labels) - seen[:3]).abs().max() < 1e-5
        if guided:
            assert (model(indices, null_labels(model, labels)) - seen[3:]).abs().max() < 1e-5


def test_per_sub_token_guidance_below_and_above_one():
    """Greedy draws = argmax of u + s_i (c - u) with s_i = 0, 0.7 and 3 for the three sub-tokens (the official
    sampler fails when some scales are <= 1 and others > 1)."""
    model = tiny()
    labels = torch.tensor([1, 2])
    scales = [0.0, 0.7, 3.0]
    indices = model.generate(labels, cfg_scale=scales, top_k=1)
    with torch.no_grad():
        c = model(indices, labels).double()
        u = model(indices, null_labels(model, labels)).double()
    s = torch.tensor(scales, dtype=torch.float64)[:, None]
    expected = (u + s * (c - u)).argmax(-1)
    assert torch.equal(indices, expected)
    assert not torch.equal(indices, c.argmax(-1))  # guidance changed the draws: the check is not vacuous


def test_batch_rows_are_independent():
    model = tiny()
    both = model.generate([0, 2], cfg_scale=1.5, top_k=1)
    assert torch.equal(both[:1], model.generate([0], cfg_scale=1.5, top_k=1))
    assert torch.equal(both[1:], model.generate([2], cfg_scale=1.5, top_k=1))


def test_fixed_generator_reproduces_samples():
    model = tiny()

    def draw(seed):
        return model.generate([0, 1, 2, 0], cfg_scale=[1.5, 2.0, 1.0], temperature=1.2, top_k=5, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    a = draw(7)
    assert torch.equal(a, draw(7))
    assert not torch.equal(a, draw(8))


def test_sampling_leaves_training_mode_and_validates():
    model = tiny().train()
    a = model.generate([1], cfg_scale=2.0, top_k=1)
    assert model.training
    assert torch.equal(a, model.eval().generate([1], cfg_scale=2.0, top_k=1))
    with pytest.raises(ValueError, match="labels"):
        model.generate([4])
    with pytest.raises(ValueError, match="sub-tokens"):
        model.generate([0], cfg_scale=[1.0, 2.0])


# ------------------------------------------------------------------------------------------- logit functions
def test_guide_formula():
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guide(c, u, 1.0), c) and torch.equal(guide(c, u, 0.0), u)
    assert torch.equal(guide(c, u, 3.0), torch.tensor([4.0, -5.0]))


def _brute_top_k(row: np.ndarray, k: int) -> np.ndarray:
    kth = sorted(row.tolist(), reverse=True)[k - 1]
    return np.array([x >= kth for x in row])


def _brute_top_p(row: np.ndarray, p: float) -> np.ndarray:
    probs = np.exp(row.astype(np.float64) - row.max())
    probs /= probs.sum()
    keep = np.zeros(len(row), dtype=bool)
    total = 0.0
    for j in sorted(range(len(row)), key=lambda j: -row[j]):  # most likely first, until the mass reaches p
        keep[j] = True
        total += probs[j]
        if total >= p:
            break
    return keep


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_filter_matches_brute_force(k):
    logits = torch.randn(20, 17, generator=torch.Generator().manual_seed(k))
    kept = torch.isfinite(top_k_filter(logits, k)).numpy()
    for row, keep in zip(logits.numpy(), kept, strict=True):
        assert (keep == _brute_top_k(row, k)).all()
    assert torch.equal(top_k_filter(logits, 0), logits)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_filter_matches_brute_force(p):
    logits = 2 * torch.randn(50, 13, generator=torch.Generator().manual_seed(int(p * 1000)))
    filtered = top_p_filter(logits, p)
    for row, out in zip(logits.numpy(), filtered.numpy(), strict=True):
        keep = _brute_top_p(row, p)
        assert (np.isfinite(out) == keep).all()
        assert (out[keep] == row[keep]).all()
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]]).repeat(40000, 1)
    draws = sample_logits(logits, temperature=0.7, top_k=5, top_p=0.8, generator=torch.Generator().manual_seed(0))
    row = logits[0].double().numpy() / 0.7
    keep = _brute_top_k(row, 5) & _brute_top_p(np.where(_brute_top_k(row, 5), row, -np.inf), 0.8)
    probs = np.where(keep, np.exp(row - row.max()), 0.0)
    probs /= probs.sum()
    freq = np.bincount(draws.numpy(), minlength=8) / draws.numel()
    assert np.abs(freq - probs).max() < 0.015  # > 5 standard deviations of a frequency from 40000 draws
    assert (freq[~keep] == 0).all()
    assert torch.equal(sample_logits(logits[:3], top_k=1), torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ bf16, compile
def test_bfloat16_model_samples_in_bfloat16():
    model = tiny()
    tokens, labels = model.generate([0, 1], cfg_scale=2.0, top_k=1), torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(tokens, labels)
        model.to(torch.bfloat16)
        out = model(tokens, labels)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert KVCache.spatial(model, 2).keys.dtype == torch.bfloat16
    indices, seen = model.generate([0, 1], cfg_scale=[1.0, 2.0, 0.5], top_k=1, return_logits=True)
    with torch.no_grad():
        assert (model(indices, labels).float() - seen[:2]).abs().max() < 0.05 * seen.abs().max()


@pytest.mark.slow
def test_compiled_sampler_matches_eager():
    """torch.compile of the two step functions (inductor on CPU; about a minute of compilation)."""
    model = tiny(spatial_layers=1, intra_layers=1, grid_height=2, grid_width=2)
    eager = model.generate([0, 1], cfg_scale=[1.5, 1.0, 2.0], top_k=1)
    assert torch.equal(model.generate([0, 1], cfg_scale=[1.5, 1.0, 2.0], top_k=1, compile=True), eager)


def test_two_caches_per_call_whatever_the_map_size(monkeypatch):
    """One spatial and one intra-position cache per generate call (not one per position)."""
    made = []
    original = KVCache.__init__

    def counting(self, *args, **kwargs):
        made.append(args[3])  # the cache length
        original(self, *args, **kwargs)

    monkeypatch.setattr(KVCache, "__init__", counting)
    model = tiny()
    model.generate([0, 1], cfg_scale=2.0)
    assert made == [model.config.num_positions, model.config.groups]
