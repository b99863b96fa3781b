import pytest
import torch

from wetok import ModelMismatchError, Tokens, WeTok, WeTokConfig

CFG = WeTokConfig(channels=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, groups=2, bits_per_group=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WeTok(CFG).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_encode_tokens_and_decode(model, images):
    with torch.no_grad():
        tokens = model.encode(images)
        assert isinstance(tokens, Tokens)
        assert tokens.indices.shape == (2, 8, 6, 2) and tokens.indices.dtype == torch.int64
        assert tokens.image_size == (32, 24) and tokens.model_id == CFG.identity()
        assert int(tokens.indices.max()) < 16
        rec = model.reconstruct(images)
        assert torch.equal(model.decode(tokens), rec)
        assert torch.equal(model.decode(tokens.indices), rec)
        assert rec.shape == images.shape


def test_sizes_not_multiple_of_f_rejected(model):
    with pytest.raises(ValueError, match="multiple"):
        model.encode(torch.zeros(1, 3, 30, 32))


def test_tokens_from_another_model_rejected(model, images):
    other = WeTok(CFG.replace(groups=4, bits_per_group=2))
    with torch.no_grad():
        tokens = other.encode(images)
    with pytest.raises(ModelMismatchError):
        model.decode(tokens)


def test_generative_decoder_seed_noise_and_scale(model, images):
    gen = model.to_generative()
    with torch.no_grad():
        # the zero-extended conv_in ignores the noise: equal to the stage-1 decoder for any noise
        tokens = model.encode(images)
        ref = model.decode(tokens)
        assert torch.allclose(gen.decode(tokens, generator=torch.Generator().manual_seed(3)), ref, atol=1e-6)
        torch.nn.init.normal_(gen.decoder.conv_in.weight, std=0.05)
        a = gen.decode(tokens, generator=torch.Generator().manual_seed(7))
        b = gen.decode(tokens, generator=torch.Generator().manual_seed(7))
        c = gen.decode(tokens, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.allclose(a, c)
        noise = torch.randn(2, 8, 8, 6, generator=torch.Generator().manual_seed(7))
        assert torch.equal(gen.decode(tokens, noise=noise), a)
        zero = gen.decode(tokens, noise=torch.zeros_like(noise))
        assert torch.equal(gen.decode(tokens, noise_scale=0.0), zero)
        assert torch.equal(gen.decode(tokens, noise=noise, noise_scale=0.0), zero)


def test_training_forward_has_loss_and_gradients():
    torch.manual_seed(0)
    m = WeTok(CFG).train()
    out = m(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out.reconstruction.shape == (2, 3, 16, 16)
    (out.reconstruction.abs().mean() + out.quantizer.loss).backward()
    assert m.encoder.conv_in.weight.grad is not None and m.encoder.conv_in.weight.grad.abs().sum() > 0


def test_config_round_trip_and_identity():
    assert WeTokConfig.from_dict(CFG.to_dict()) == CFG
    assert CFG.identity() == WeTokConfig.from_dict(CFG.to_dict()).identity()
    assert CFG.identity() != CFG.replace(groups=4, bits_per_group=2).identity()
    assert CFG.identity() == CFG.replace(generative_decoder=True).identity()
    with pytest.raises(ValueError):
        WeTokConfig(z_channels=30, groups=4, bits_per_group=8)
    assert CFG.downsample_factor == 4
    assert WeTokConfig().compression_ratio(256, 256) == 192.0
