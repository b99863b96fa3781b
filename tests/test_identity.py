"""Tokens know the weights that made them: tokens of another trained model of the same architecture are refused,
a stage-2 (generative-decoder) model still decodes its stage-1 tokens, and files written before the weights
identity still load."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import EXAMPLES
from wetok import ModelMismatchError, Tokens, WeTok
from wetok.data import load_rgb
from wetok.image import pad_to_multiple, pil_to_tensor
from wetok.registry import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no bundled model")


@pytest.fixture(scope="module")
def bundled() -> WeTok:
    return WeTok.from_pretrained("default")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    pixels = pil_to_tensor(load_rgb(sorted(EXAMPLES.glob("*.png"))[0]).resize((48, 40)))[None]
    return pad_to_multiple(pixels, 8)[0]


def _random_small_f8(seed: int = 0) -> WeTok:
    torch.manual_seed(seed)
    return WeTok.from_preset("small-f8").eval()


def test_weights_id_follows_the_encoder_and_quantizer_weights_only(bundled):
    again = WeTok.from_pretrained(DEFAULT_MODEL_DIR)
    assert again.weights_id == bundled.weights_id and len(bundled.weights_id) == 16
    other = _random_small_f8()
    assert other.model_id == bundled.model_id  # same architecture ...
    assert other.weights_id != bundled.weights_id  # ... other weights
    changed = bundled.copy()
    with torch.no_grad():
        changed.decoder.conv_out.weight.add_(1.0)
    assert changed.refresh_weights_id() == bundled.weights_id  # the decoder does not make the tokens
    with torch.no_grad():
        w = changed.encoder.conv_in.weight
        w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(1.0))  # one ulp of one encoder weight
    assert changed.refresh_weights_id() != bundled.weights_id
    # loading other weights recomputes it; converting the dtype afterwards keeps it
    changed.load_state_dict(other.state_dict())
    assert changed.weights_id == other.weights_id
    assert bundled.copy().to(torch.bfloat16).weights_id == bundled.weights_id


@pytest.mark.parametrize("suffix", [".json", ".wtok"])
def test_tokens_of_another_trained_model_are_refused(tmp_path, bundled, image, suffix):
    other = _random_small_f8()
    with torch.inference_mode():
        tokens = other.encode(image)
    assert tokens.model_id == bundled.model_id and tokens.weights_id == other.weights_id
    with pytest.raises(ModelMismatchError, match="other trained weights"):
        bundled.decode(tokens)
    path = tokens.save(tmp_path / f"t{suffix}")
    back = Tokens.load(path)
    assert back.weights_id == other.weights_id and torch.equal(back.indices, tokens.indices)
    with pytest.raises(ModelMismatchError, match=f"{path}: tokens were made by a model with other trained weights"):
        Tokens.load(path, bundled)
    Tokens.load(path, other)  # the model that made them reads them


def test_stage2_model_decodes_stage1_tokens(tmp_path, bundled, image):
    with torch.inference_mode():
        tokens = bundled.encode(image)
    stage2 = bundled.to_generative()
    with torch.no_grad():  # stage-2 training changes the decoder only
        stage2.decoder.conv_out.weight.mul_(1.5)
    stage2.refresh_weights_id()
    assert stage2.weights_id == bundled.weights_id
    loaded = Tokens.load(tokens.save(tmp_path / "t.wtok"), stage2)
    with torch.inference_mode():
        out = stage2.decode(loaded, noise_scale=0.0)
        reference = stage2.decode(tokens.indices, noise_scale=0.0)  # bare indices: no identity check
    assert torch.equal(out, reference)


def test_cli_refuses_tokens_of_a_random_model(tmp_path, capsys):
    from wetok.cli.main import main as cli_main

    photo = str(sorted(EXAMPLES.glob("*.png"))[0])
    assert cli_main(["encode", photo, "-o", str(tmp_path / "t.wtok"), "--model", "small-f8", "--random-init",
                     "--size", "32", "-q"]) == 0
    capsys.readouterr()
    assert cli_main(["decode", str(tmp_path / "t.wtok"), "-o", str(tmp_path / "d.png"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other trained weights" in err[0] and "small-f8" in err[0]
    assert not (tmp_path / "d.png").exists()


@pytest.mark.parametrize("suffix", [".json", ".wtok"])
def test_files_without_a_weights_identity_still_load(tmp_path, bundled, image, suffix):
    """Files written before the weights identity (architecture identity only) are checked on the architecture."""
    with torch.inference_mode():
        tokens = bundled.encode(image)
    old = Tokens(tokens.indices, tokens.image_size, bits_per_group=8, model_id=tokens.model_id, model="default")
    path = old.save(tmp_path / f"old{suffix}")
    if suffix == ".json":
        meta = json.loads(path.read_text())["wetok_meta"]
        assert meta["weights_id"] is None
        obj = json.loads(path.read_text())
        del obj["wetok_meta"]["weights_id"]  # as the earlier releases wrote it
        path.write_text(json.dumps(obj))
    else:  # the identity field holds the 16-digit architecture identity alone
        data = path.read_bytes()
        assert data[42] == 16 and data[43:59] == tokens.model_id.encode()
    back = Tokens.load(path, bundled)
    assert back.weights_id is None and torch.equal(back.indices, tokens.indices)
    Tokens.load(path, _random_small_f8())  # only the architecture can be checked
    with torch.inference_mode():
        assert torch.equal(bundled.decode(back), bundled.decode(tokens))
