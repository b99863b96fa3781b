import torch
import torch.nn.functional as F

from official_reference import _adagn, _resblock, depth_to_space_dcr
from wetok.blocks import AdaptiveGroupNorm, ResBlock, dcr_to_pixel_shuffle, pixel_shuffle_to_dcr


def test_depth_to_space_dcr_formula_on_a_known_tensor():
    x = torch.arange(8.0).reshape(1, 8, 1, 1)  # C' = 2: channel (2i+j)*2 + c goes to (c, i, j)
    out = depth_to_space_dcr(x)
    assert out[0, 0].tolist() == [[0.0, 2.0], [4.0, 6.0]]
    assert out[0, 1].tolist() == [[1.0, 3.0], [5.0, 7.0]]


def test_weight_permutation_turns_pixel_shuffle_into_dcr():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 3, 4, generator=g)
    assert torch.equal(F.pixel_shuffle(dcr_to_pixel_shuffle(x.transpose(0, 1)).transpose(0, 1), 2),
                       depth_to_space_dcr(x))
    assert not torch.equal(F.pixel_shuffle(x, 2), depth_to_space_dcr(x))
    w = torch.randn(12, 5, 3, 3, generator=g)
    assert torch.equal(pixel_shuffle_to_dcr(dcr_to_pixel_shuffle(w)), w)


def test_resblock_matches_reference_with_and_without_shortcut():
    torch.manual_seed(0)
    for cin, cout in [(32, 32), (32, 64)]:
        block = ResBlock(cin, cout).double()
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(2, cin, 5, 6, dtype=torch.float64)
        sd = {f"b.{k}": v for k, v in block.state_dict().items()}
        assert torch.allclose(block(x), _resblock(x, sd, "b"), atol=1e-12)


def test_adaptive_group_norm_unbiased_variance_and_1x1_latent():
    torch.manual_seed(0)
    agn = AdaptiveGroupNorm(8, 64).double()
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64)
    style = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    sd = {f"a.{k}": v for k, v in agn.state_dict().items()}
    assert torch.allclose(agn(x, style), _adagn(x, style, sd, "a"), atol=1e-12)
    # by hand for one sample/channel: sigma uses the (N-1) variance
    flat = style[0, 3].flatten()
    sigma = torch.sqrt(((flat - flat.mean()) ** 2).sum() / (flat.numel() - 1) + 1e-6)
    scale = agn.gamma.weight[5] @ torch.sqrt(style[0].flatten(1).var(-1) + 1e-6) + agn.gamma.bias[5]
    assert torch.isclose(torch.sqrt(style[0].flatten(1).var(-1) + 1e-6)[3], sigma)
    group = x[0, 4:6]  # GroupNorm(32) over 64 channels: channel 5 shares its statistics with channel 4
    normed = (x[0, 5] - group.mean()) / torch.sqrt(group.var(unbiased=False) + 1e-6)
    shift = agn.beta.weight[5] @ style[0].flatten(1).mean(-1) + agn.beta.bias[5]
    assert torch.allclose(agn(x, style)[0, 5], normed * scale + shift, atol=1e-10)
    assert torch.isfinite(agn(x, style[:, :, :1, :1])).all()  # the official code gives NaN here
