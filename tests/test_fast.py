import copy
import functools

import pytest
import torch

from official_reference import official_decode
from wetok import WeTok, WeTokConfig
from wetok.fast import (
    StableGroupNorm,
    WinogradConv2d,
    has_native_bf16,
    inference,
    nnpack_available,
    optimize,
    resolve_dtype,
)
from wetok.official import to_official_state_dict

CFG = WeTokConfig(channels=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=16, groups=4, bits_per_group=4)


@pytest.fixture(autouse=True)
def _private_conv_cache(monkeypatch, tmp_path):
    """Convolution choices measured here go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("WETOK_CACHE_DIR", str(tmp_path / "cache"))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double().clamp(-1, 1) - b.double().clamp(-1, 1)).pow(2).mean()
    return float(10 * torch.log10(4 / mse))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = WeTok(CFG).eval()
    for p in m.parameters():  # non-trivial norms and biases, so that every parameter matters
        if p.dim() == 1:
            p.data.normal_(0.5 if p.shape[0] % 2 else 0.0, 0.2)
    return m


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear")
    return (smooth + 0.1 * torch.rand(2, 3, 32, 32, generator=g)) * 1.6 - 0.8


def test_in_place_blocks_are_bit_identical_to_the_autograd_path(model, images):
    """Without autograd the blocks work in place; with it they do not: same kernels, so equal bit for bit."""
    with torch.enable_grad():
        latent = model.encode_latent(images)
        codes = model.quantizer(latent).quantized
        ref = model.decode_codes(codes)
    assert ref.requires_grad
    x = images.clone()
    with inference():
        assert torch.equal(model.encode_latent(x), latent)
        codes_in = codes.detach().clone()
        assert torch.equal(model.decode_codes(codes_in), ref)
    assert torch.equal(x, images) and torch.equal(codes_in, codes)  # the inputs are never overwritten


def test_fast_float32_matches_float64_and_the_official_decoder(model, images):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize(copy.deepcopy(model), dtype="float32", channels_last=True)
    assert fast.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # parameters: same names, dtype and values (only the memory layout changed)
    after = fast.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    reference = copy.deepcopy(model).double()
    with inference():
        latent = fast.encode_latent(images)
        ref_latent = reference.encode_latent(images.double())
        assert (latent.double() - ref_latent).abs().max() < 1e-4
        indices = reference.quantizer(ref_latent).indices
        rec = fast.decode(indices)
        codes = reference.quantizer(ref_latent).quantized
        sd = {k[len("decoder."):]: v.double() for k, v in to_official_state_dict(model).items()
              if k.startswith("decoder.")}
        official = official_decode(sd, codes, levels=len(CFG.ch_mult), num_res_blocks=CFG.num_res_blocks)
    assert rec.dtype == torch.float32 and rec.is_contiguous()
    assert (rec.double() - official).abs().max() < 1e-4


def test_fast_float32_group_norm_stays_accurate_for_offset_activations(model):
    """Trained models feed GroupNorm activations whose mean is large against their spread; PyTorch's channels_last
    CPU kernel loses float32 precision there (E[x^2] - E[x]^2), so the fast path normalises in NCHW."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.decoder.conv_in.bias.fill_(100.0)  # mid-block GroupNorm input: mean 100, spread ~1 (CL kernel: 9e-4 off)
    fast = optimize(copy.deepcopy(m), dtype="float32", channels_last=True)
    indices = torch.randint(0, 16, (2, 8, 8, 4), generator=torch.Generator().manual_seed(0))
    with inference():
        rec = fast.decode(indices)
        ref = m.double().decode(indices)
    assert (rec.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("affine", [True, False])
def test_stable_group_norm_on_channels_last_matches_float64(affine):
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(8, 64, eps=1e-6, affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight, generator=g)
        torch.nn.init.normal_(norm.bias, generator=g)
    norm.__class__ = StableGroupNorm
    x = (torch.randn(2, 64, 96, 80, generator=g) * 0.5 + 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = norm(x)
        # float64 by the definition: per sample and group of 8 channels, (x - mean) / sqrt(biased var + eps)
        xg = x.double().reshape(2, 8, -1)
        ref = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, correction=0, keepdim=True) + 1e-6))
        ref = ref.reshape(x.shape)
        if affine:
            ref = ref * norm.weight.double().view(1, -1, 1, 1) + norm.bias.double().view(1, -1, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - ref).abs().max() < 2e-5
    # the native channels_last kernel is the reason for this class: it is visibly less accurate here
    native = torch.nn.functional.group_norm(x, 8, norm.weight, norm.bias, 1e-6)
    assert (native.double() - ref).abs().max() > 10 * (out.double() - ref).abs().max()


def test_optimized_model_still_saves_and_loads(model, tmp_path, images):
    fast = optimize(copy.deepcopy(model), channels_last=True)
    fast.save_pretrained(tmp_path / "m")
    loaded = WeTok.from_pretrained(tmp_path / "m")
    for (k, v), (_, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(v, v2), k


def test_bfloat16_quantizer_in_float32_and_decoder_psnr(model, images):
    seen = []
    fast = optimize(copy.deepcopy(model), dtype="bfloat16")
    assert fast.encoder.conv_in.weight.dtype == torch.bfloat16
    fast.quantizer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with inference():
        ref_tokens = model.encode(images)
        ref = model.decode(ref_tokens)
        tokens = fast.encode(images)
        rec = fast.decode(ref_tokens)
    assert seen == [torch.float32]
    assert rec.dtype == torch.float32
    # the decoder's own precision: decoding the same tokens in bfloat16 vs float32
    assert _psnr(rec, ref) >= 40
    # random-weight latents sit close to zero, so a few bits flip; most tokens agree
    assert (tokens.indices == ref_tokens.indices).float().mean() > 0.8


def test_bfloat16_reconstruction_when_latents_are_away_from_zero(model, images):
    """Trained encoders are pushed to |u| ~ 1 by the commitment loss; then bf16 flips no bit and the whole
    reconstruction agrees with float32 to >= 40 dB."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.encoder.conv_out.weight.mul_(0.01)
        m.encoder.conv_out.bias.copy_(torch.where(torch.arange(16) % 3 == 0, 1.0, -1.0))
    fast = optimize(copy.deepcopy(m), dtype="bfloat16")
    with inference():
        tokens, ref_tokens = fast.encode(images), m.encode(images)
        assert torch.equal(tokens.indices, ref_tokens.indices)
        assert _psnr(fast.reconstruct(images), m.reconstruct(images)) >= 40


def test_generative_decoder_in_bfloat16_draws_float32_noise(model):
    gen = optimize(model.to_generative(), dtype="bfloat16")
    with torch.no_grad():
        torch.nn.init.normal_(gen.decoder.conv_in.weight, std=0.05)
    indices = torch.randint(0, 16, (1, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    with inference():
        a = gen.decode(indices, generator=torch.Generator().manual_seed(3))
        b = gen.decode(indices, generator=torch.Generator().manual_seed(3))
        c = gen.decode(indices, generator=torch.Generator().manual_seed(4))
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)


def test_dtype_resolution(monkeypatch):
    import wetok.fast as fast

    assert resolve_dtype(None) is None
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype(torch.float16) is torch.float16
    monkeypatch.setattr(fast._cpu, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert has_native_bf16("cpu") and resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(fast._cpu, "cpu_flags", lambda: {"avx2"})
    assert not has_native_bf16("cpu") and resolve_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8")


@pytest.mark.parametrize("flags,decoder", [({"avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}, torch.bfloat16),
                                          ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                          ({"avx2", "fma"}, torch.float32)])
def test_auto_encodes_in_float32_and_decodes_in_bf16_where_native(monkeypatch, model, images, flags, decoder):
    """dtype="auto": tokens exactly those of a float32 model; the decoder in bf16 only where the CPU has it."""
    import wetok.fast as fast

    monkeypatch.setattr(fast._cpu, "cpu_flags", lambda: flags)
    assert fast.auto_dtypes("cpu") == (torch.float32, decoder)
    auto = optimize(copy.deepcopy(model), dtype="auto")
    assert auto.encoder.conv_in.weight.dtype == torch.float32 and auto.decoder.conv_in.weight.dtype == decoder
    with inference():
        tokens, ref_tokens = auto.encode(images), model.encode(images)
        rec, ref = auto.decode(tokens.indices), model.decode(tokens.indices)
    assert torch.equal(tokens.indices, ref_tokens.indices)
    assert rec.dtype == torch.float32
    if decoder == torch.float32:
        assert (rec - ref).abs().max() < 1e-4
    else:
        assert 40 <= _psnr(rec, ref) < 100  # bf16 arithmetic: close to, not equal to, float32


needs_nnpack = pytest.mark.skipif(not nnpack_available(), reason="this PyTorch build has no NNPACK")


@needs_nnpack
def test_winograd_convolution_matches_float64(monkeypatch):
    monkeypatch.setenv("WETOK_CONV_CHOICE", "rules")
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(128, 160, 3, padding=1)
    conv.__class__ = WinogradConv2d
    x = torch.randn(2, 128, 48, 56, generator=g)  # 128 channels x 2688 pixels >= MIN_WORK: Winograd
    small = torch.randn(1, 128, 16, 16, generator=g)  # below MIN_WORK: oneDNN with a channels_last weight copy
    calls = []
    original = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or original(*a))
    def direct(t):
        return torch.nn.functional.conv2d(t.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad():
        ref, ref_small = direct(x), direct(small)
        out = conv(x)
        assert len(calls) == 2 and out.shape == ref.shape  # one call per image
        # Winograd F(6x6, 3x3) rounding: not bit-identical to a direct convolution, but within float32 tolerance
        assert (out.double() - ref).abs().max() / ref.abs().max() < 5e-5
        assert torch.allclose(conv(small).double(), ref_small, atol=1e-5) and len(calls) == 2
    with torch.enable_grad():  # autograd takes the ordinary convolution
        assert torch.allclose(conv(x), ref.float(), atol=1e-4) and conv(x).requires_grad
    with torch.no_grad():
        conv.weight.mul_(2)  # the channels_last copy follows changes of the weight
        assert torch.allclose(conv(small).double(), direct(small), atol=1e-5)


@needs_nnpack
@pytest.mark.parametrize("mode", ["rules", "measure", "winograd"])
def test_winograd_model_matches_float64(monkeypatch, tmp_path, mode):
    """Whatever kernel each layer gets (fixed rules, measured on this machine, or Winograd everywhere), the fast
    float32 pass stays within 1e-4 of float64."""
    monkeypatch.setenv("WETOK_CONV_CHOICE", mode)
    monkeypatch.setenv("WETOK_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    cfg = WeTokConfig(channels=128, ch_mult=(1, 1), num_res_blocks=1, z_channels=16, groups=4, bits_per_group=4)
    model = WeTok(cfg).eval()
    fast = optimize(copy.deepcopy(model), dtype="float32")
    swapped = [m for m in fast.modules() if isinstance(m, WinogradConv2d)]
    # the 3x3 stride-1 convs with >= 128 channels in and out: 6 in the encoder, 6 + the upsampler in the decoder;
    # not the convs from or to 3 image channels or 16 latent channels, nor the stride-2 downsampler
    assert len(swapped) == 13
    calls = []
    original = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or original(*a))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    reference = copy.deepcopy(model).double()
    with inference():
        latent = fast.encode_latent(x)
        ref_latent = reference.encode_latent(x.double())
        indices = reference.quantizer(ref_latent).indices
        rec, ref = fast.decode(indices), reference.decode(indices)
    assert calls or mode == "measure"  # the Winograd path ran (measuring may find oneDNN faster everywhere)
    assert (latent.double() - ref_latent).abs().max() < 1e-4
    assert (rec.double() - ref).abs().max() < 1e-4


@functools.cache
def _compile_works() -> bool:
    try:
        fn = torch.compile(lambda t: torch.nn.functional.silu(t) + 1, backend="inductor")
        return bool(torch.allclose(fn(torch.ones(4)), torch.nn.functional.silu(torch.ones(4)) + 1))
    except Exception:
        return False


@pytest.mark.slow
def test_compiled_model_matches_eager(images):
    if not _compile_works():
        pytest.skip("torch.compile (inductor) is not usable here")
    torch.manual_seed(0)
    model = WeTok(CFG.replace(ch_mult=(1, 2), num_res_blocks=1)).eval()
    fast = optimize(copy.deepcopy(model), compile=True)
    with inference():
        latent = fast.encode_latent(images)
        ref_latent = model.encode_latent(images)
        indices = model.quantizer(ref_latent).indices
        rec, ref = fast.decode(indices), model.decode(indices)
    assert (latent - ref_latent).abs().max() < 1e-4
    assert (rec - ref).abs().max() < 1e-4
