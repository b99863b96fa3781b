"""tools/deepen.py (function-preserving growth of a tokenizer) and tools/realism.py's statistics (KID, low-pass
images), against independent references: the source model's own output, torchmetrics' polynomial MMD, a float64
loop and numpy block means."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.image.kid import poly_mmd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import deepen as dp  # noqa: E402
import realism as rl  # noqa: E402

from wetok import WeTok, WeTokConfig  # noqa: E402


def _trained_like(cfg: WeTokConfig, seed: int) -> WeTok:
    """A model whose every weight is non-trivial (a fresh model has zero-initialised pieces in some layers)."""
    torch.manual_seed(seed)
    model = WeTok(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_deepen_keeps_the_function_and_adds_learnable_blocks(tmp_path):
    cfg = WeTokConfig(channels=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, groups=2, bits_per_group=4,
                      norm_groups=8, name="tiny")
    source = _trained_like(cfg, 0)
    deep = dp.deepen(source, 3)
    assert deep.config.num_res_blocks == 3 and deep.config.name == "tiny-r3"
    assert deep.num_parameters()["total"] > source.num_parameters()["total"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        a, b = source(x), deep(x)
    torch.testing.assert_close(b.reconstruction, a.reconstruction, rtol=0, atol=1e-5)
    assert torch.equal(deep.encode(x).indices, source.encode(x).indices)
    # the source's weights sit where they were; the added blocks' other weights are not zero (they can learn)
    deep_state, source_state = deep.state_dict(), source.state_dict()
    for key, value in source_state.items():
        assert torch.equal(deep_state[key], value), key
    added = [k for k in deep_state if k not in source_state]
    assert added and any(k.endswith("conv1.weight") and deep_state[k].abs().sum() > 0 for k in added)
    assert all(deep_state[k].abs().sum() == 0 for k in added if k.endswith("conv2.weight"))
    # moving an added block changes the output: it is in the computation, not dead weight
    with torch.no_grad():
        next(deep_state[k] for k in added if k.endswith("conv2.weight")).normal_()
        assert (deep(x).reconstruction - a.reconstruction).abs().max() > 1e-3
    with pytest.raises(ValueError, match="must exceed"):
        dp.deepen(source, 1)
    # the command writes a loadable folder with the deeper configuration
    source.save_pretrained(tmp_path / "src")
    assert dp.main([str(tmp_path / "src"), str(tmp_path / "out"), "--num-res-blocks", "2"]) == 0
    assert WeTok.from_pretrained(tmp_path / "out").config.num_res_blocks == 2


def test_deepen_command_rejects_bad_input_without_writing(tmp_path, capsys):
    cfg = WeTokConfig(channels=16, ch_mult=(1, 2), num_res_blocks=2, z_channels=8, groups=2, bits_per_group=4,
                      norm_groups=8)
    WeTok(cfg).save_pretrained(tmp_path / "src")
    for argv, reason in (([str(tmp_path / "src"), str(tmp_path / "out"), "--num-res-blocks", "2"], "must exceed"),
                         ([str(tmp_path / "missing"), str(tmp_path / "out"), "--num-res-blocks", "3"], "missing"),
                         ([str(tmp_path / "src"), str(tmp_path / "src"), "--num-res-blocks", "3"], "not an empty")):
        assert dp.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and reason in err[0]
        assert not (tmp_path / "out").exists()
    assert sorted(q.name for q in (tmp_path / "src").iterdir()) == ["config.json", "model.safetensors"]


def _mmd_loop(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda u, v: (float(u @ v) / d + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g, dtype=torch.float64)
    b = torch.randn(40, 6, generator=g, dtype=torch.float64) * 1.3 + 0.4
    mean, std = rl.kid(a, b, subsets=1, size=40, seed=0)  # one subset of everything: a permutation, same MMD
    assert std == 0
    assert mean == pytest.approx(_mmd_loop(a.numpy(), b.numpy()), rel=1e-10)
    assert mean == pytest.approx(float(poly_mmd(a, b)), rel=1e-10)
    c = torch.randn(400, 6, generator=g, dtype=torch.float64)  # another draw of a's distribution
    d = torch.randn(400, 6, generator=g, dtype=torch.float64)
    same, _ = rl.kid(c, d, subsets=4, size=200, seed=0)
    assert abs(same) < mean / 10


def test_lowpass_is_the_rounded_block_mean():
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    expected = images.astype(np.float64).reshape(2, 2, 8, 3, 8, 3).mean(axis=(2, 4))
    np.testing.assert_array_equal(rl.lowpass(images), np.round(expected).astype(np.uint8))
