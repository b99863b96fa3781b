"""wetok.onnx_export / `wetok export-onnx`: the exported graphs, run by onnxruntime (CPU) and by torch.export.load,
against the PyTorch model and the official fixture, at two sizes and batch sizes (the shapes are dynamic)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import CI, FIXTURES, PHOTOS
from hostile import assert_refused, run_wetok
from wetok import WeTok
from wetok.image import pil_to_tensor
from wetok.official import load_official
from wetok.onnx_export import export_onnx, export_program
from wetok.quantizer import codes_to_indices, to_official_flat

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
if CI and not HAVE_ONNX:  # the test extras install them: a CI run must not pass by skipping these tests
    pytest.fail("CI=true but the onnx extras are missing (pip install -e '.[test]' installs them)", pytrace=False)
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="needs the onnx extras (pip install 'wetok[onnx]')")
CKPT, YAML, OUTPUTS = FIXTURES / "tiny_ds16_g4.ckpt", FIXTURES / "tiny_ds16_g4.yaml", FIXTURES / "tiny_ds16_g4.outputs.pt"
#: (batch, height, width) of the two runs of every graph: neither is the size the graphs were traced at
SIZES = [(1, 64, 96), (3, 48, 32)]


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, **inputs: torch.Tensor) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in sess.run(None, {k: v.numpy() for k, v in inputs.items()})]


def photos(batch: int, height: int, width: int, offset: int = 0) -> torch.Tensor:
    files = sorted(PHOTOS.glob("*.jpg")) or sorted(PHOTOS.glob("*.png"))
    images = [Image.open(files[(offset + i) % len(files)]).convert("RGB").resize((width, height), Image.BICUBIC)
              for i in range(batch)]
    return torch.stack([pil_to_tensor(img) for img in images])


def assert_same_tokens(indices: torch.Tensor, latent: torch.Tensor, model: WeTok, images: torch.Tensor) -> int:
    """The graph's latent within 1e-4 of PyTorch's, its indices the signs of its own latent, and equal to PyTorch's
    except where a latent lies within that round-off of zero (either sign is right there). Returns how many
    tokens had such a latent."""
    with torch.no_grad():
        reference = model.encode_latent(images)
        expected = model.encode(images).indices
    error = (latent - reference).abs().max()
    assert error < 1e-4
    assert indices.dtype == torch.int64 and torch.equal(indices, codes_to_indices(latent, model.config.groups))
    b, d, h, w = reference.shape
    unsure = (reference.abs() <= error).permute(0, 2, 3, 1).reshape(b, h, w, model.config.groups, -1).any(-1)
    assert torch.equal(indices[~unsure], expected[~unsure])
    return int(unsure.sum())


@pytest.fixture(scope="module")
def default_model() -> WeTok:
    return WeTok.from_pretrained("default").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def default_onnx(tmp_path_factory) -> Path:
    """The bundled model exported by the command line."""
    out = tmp_path_factory.mktemp("onnx") / "default"
    result = run_wetok("export-onnx", "default", "-o", out, "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@needs_onnx
def test_default_encoder_gives_the_tokens_of_pytorch(default_model, default_onnx):
    sess = session(default_onnx / "encoder.onnx")
    for i, (batch, height, width) in enumerate(SIZES):
        images = photos(batch, height, width, offset=3 * i)
        indices, latent = run(sess, images=images)
        assert indices.shape == (batch, height // 8, width // 8, 4)
        # a trained encoder keeps its latents away from the sign threshold: every token is the same
        assert assert_same_tokens(indices, latent, default_model, images) == 0


@needs_onnx
def test_default_decoder_matches_pytorch(default_model, default_onnx):
    sess = session(default_onnx / "decoder.onnx")
    gen = torch.Generator().manual_seed(1)
    for batch, height, width in SIZES:
        indices = torch.randint(0, 256, (batch, height // 8, width // 8, 4), generator=gen)
        (images,) = run(sess, indices=indices)
        with torch.no_grad():
            reference = default_model.decode(indices)
        assert images.shape == (batch, 3, height, width)
        assert (images - reference).abs().max() < 1e-4
        assert reference.abs().max() > 0.1  # a real image, not a trivially small one


@needs_onnx
def test_metadata_describes_the_graphs(default_model, default_onnx):
    import onnx

    meta = json.loads((default_onnx / "metadata.json").read_text())
    cfg = default_model.config
    assert (meta["downsample_factor"], meta["groups"], meta["bits_per_group"]) == (8, cfg.groups, cfg.bits_per_group)
    assert meta["weights_id"] == default_model.weights_id and meta["model_id"] == default_model.model_id
    assert meta["format"] == "onnx" and meta["generative_decoder"] is False
    for part in ("encoder", "decoder"):
        graph = meta["graphs"][part]
        assert graph["files"] == [f"{part}.onnx"]
        assert onnx.load(default_onnx / graph["file"]).opset_import[0].version == meta["opset"] == 18
        sess = session(default_onnx / graph["file"])
        for described, actual in ((graph["inputs"], sess.get_inputs()), (graph["outputs"], sess.get_outputs())):
            assert [(d["name"], d["shape"]) for d in described] == [(a.name, a.shape) for a in actual]
            assert [{"float32": "tensor(float)", "int64": "tensor(int64)"}[d["dtype"]] for d in described] == \
                [a.type for a in actual]
    assert meta["graphs"]["encoder"]["inputs"][0]["shape"] == ["batch", 3, "8*h", "8*w"]


@needs_onnx
@pytest.mark.shared(CKPT, YAML, OUTPUTS)
def test_official_fixture(tmp_path):
    outputs = torch.load(OUTPUTS, weights_only=True)
    model = load_official(CKPT, YAML).eval().requires_grad_(False)
    paths = export_onnx(model, tmp_path / "official")
    encoder, decoder = session(paths["encoder"]), session(paths["decoder"])
    # the official implementation's own outputs (64x64, batch 2)
    indices, latent = run(encoder, images=outputs["input"])
    assert (latent - outputs["latent"]).abs().max() < 1e-4
    assert torch.equal(to_official_flat(indices), outputs["indices"])
    (images,) = run(decoder, indices=indices)
    assert (images - outputs["reconstruction"]).abs().max() < 1e-4
    with torch.no_grad():
        assert (images - model.decode(indices)).abs().max() < 1e-4
    # other sizes and batches: against the PyTorch model
    for batch, height, width in [(1, 96, 64), (3, 32, 48)]:
        other = photos(batch, height, width)
        other_indices, other_latent = run(encoder, images=other)
        assert assert_same_tokens(other_indices, other_latent, model, other) <= other_indices.numel() // 100
        (decoded,) = run(decoder, indices=other_indices)
        with torch.no_grad():
            assert (decoded - model.decode(other_indices)).abs().max() < 1e-4


@pytest.fixture(scope="module")
def generative() -> WeTok:
    """A stage-2 model (tiny-f8, seeded weights) whose noise channels matter: to_generative() zeroes them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WeTok.from_preset("tiny-f8").to_generative().eval().requires_grad_(False)
        weight = model.decoder.conv_in.weight
        weight.data[:, weight.shape[1] // 2:] = torch.randn_like(weight[:, weight.shape[1] // 2:]) * 0.1
    return model


@needs_onnx
def test_generative_decoder_takes_noise(generative, tmp_path):
    paths = export_onnx(generative, tmp_path / "gen", parts=("decoder",))
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["decoder.onnx", "metadata.json"]
    sess = session(paths["decoder"])
    assert [i.name for i in sess.get_inputs()] == ["indices", "noise"]
    gen = torch.Generator().manual_seed(2)
    d = generative.config.groups * generative.config.bits_per_group
    for batch, height, width in SIZES:
        h, w = height // 8, width // 8
        indices = torch.randint(0, 2**generative.config.bits_per_group, (batch, h, w, 4), generator=gen)
        noise = torch.randn(batch, d, h, w, generator=gen)
        (images,) = run(sess, indices=indices, noise=noise)
        (quiet,) = run(sess, indices=indices, noise=torch.zeros_like(noise))
        with torch.no_grad():
            assert (images - generative.decode(indices, noise=noise)).abs().max() < 1e-4
            assert (quiet - generative.decode(indices, noise=noise, noise_scale=0)).abs().max() < 1e-4
        assert (images - quiet).abs().max() > 1e-2  # the noise input is wired in


def test_exported_program_round_trip(generative, tmp_path):
    paths = export_program(generative, tmp_path / "gen")
    meta = json.loads(paths["metadata"].read_text())
    assert meta["format"] == "exported-program" and meta["opset"] is None and meta["generative_decoder"] is True
    assert [i["name"] for i in meta["graphs"]["decoder"]["inputs"]] == ["indices", "noise"]
    encoder = torch.export.load(paths["encoder"]).module()
    decoder = torch.export.load(paths["decoder"]).module()
    gen = torch.Generator().manual_seed(3)
    for batch, height, width in SIZES:
        images = torch.rand(batch, 3, height, width, generator=gen) * 2 - 1
        noise = torch.randn(batch, 16, height // 8, width // 8, generator=gen)
        with torch.no_grad():
            indices, latent = encoder(images)
            # the program runs the eager model's kernels: the same latent to the bit, so the same tokens
            assert torch.equal(latent, generative.encode_latent(images))
            assert torch.equal(indices, generative.encode(images).indices)
            reference = generative.decode(indices, noise=noise)
            assert (decoder(indices, noise) - reference).abs().max() < 1e-5


def test_cli_refusals(tmp_path):
    # without the optional packages: one line saying what to install, nothing written
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "onnxscript.py").write_text("raise ImportError('hidden for this test')\n")
    out = tmp_path / "out"
    result = run_wetok("export-onnx", "default", "-o", out, env={"PYTHONPATH": str(blocker)})
    assert_refused(result, contains=("onnxscript", "pip install 'wetok[onnx]'"), output=out)
    assert not out.exists()
    (out / "keep").mkdir(parents=True)
    result = run_wetok("export-onnx", "default", "-o", out, "--format", "exported-program")
    assert_refused(result, contains=(str(out), "not an empty folder"))
    assert [p.name for p in out.iterdir()] == ["keep"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(format="torchscript"), "format must be one of onnx, exported-program"),
    (dict(parts=("encoder", "quantizer")), "parts must be"),
    (dict(parts=()), "parts must be"),
    (dict(opset=17), "opset must be 18 or higher"),
])
def test_bad_arguments_write_nothing(generative, tmp_path, kwargs, message):
    from wetok.onnx_export import export_graphs

    with pytest.raises(ValueError, match=message):
        export_graphs(generative, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []
