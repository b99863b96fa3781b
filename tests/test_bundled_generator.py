"""The bundled CIFAR-10 generator (``cifar10-ar``) and its tokenizer (``cifar10-tokenizer``): registered names that
mean trained weights, the default of ``wetok sample``, and weights that learnt the data (a loss far below the
uniform one on real test images, which it never saw)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED
from test_generation_cli import wetok
from wetok import WeTok
from wetok.generation import BUNDLED_GENERATOR_DIR, WeTokAR
from wetok.image import pil_to_tensor, to_uint8

CIFAR_TEST = SHARED / "data" / "cifar10" / "test"


@pytest.fixture(scope="module")
def bundled():
    return WeTokAR.from_pretrained("cifar10-ar")


def test_names_load_the_bundled_weights(bundled):
    folder = WeTokAR.from_pretrained(BUNDLED_GENERATOR_DIR)
    for (name, a), (_, b) in zip(bundled.state_dict().items(), folder.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokenizer = WeTok.from_pretrained("cifar10-tokenizer")
    assert tokenizer.weights_id == bundled.tokenizer.weights_id
    assert (bundled.config.groups, bundled.config.bits_per_group) == (tokenizer.config.groups,
                                                                       tokenizer.config.bits_per_group)


@pytest.mark.shared(CIFAR_TEST)
def test_bundled_generator_learnt_the_test_images(bundled):
    """Teacher-forced loss on 50 test images (5 per class) against the uniform loss g ln 2^d' = 11.09."""
    classes = sorted(p.name for p in CIFAR_TEST.iterdir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((CIFAR_TEST / name).iterdir())[:5]:
            images.append(pil_to_tensor(Image.open(path).convert("RGB")))
            labels.append(label)
    with torch.inference_mode():
        indices = bundled.tokenizer.encode(torch.stack(images)).indices
        loss = bundled.eval().loss(indices, torch.tensor(labels)).item()
        null = bundled.loss(indices, torch.full((len(labels),), bundled.config.num_classes)).item()
    uniform = bundled.config.groups * math.log(2 ** bundled.config.bits_per_group)
    assert loss < 0.55 * uniform  # the run's validation loss was 4.35 (docs/cifar10-generator.md)
    assert loss < null  # the class helps


def test_sample_defaults_to_the_bundled_generator(bundled, tmp_path):
    out = tmp_path / "out"
    result = wetok("sample", "3", "7", "--per-class", "2", "--cfg", "3", "--seed", "5", "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert "randomly initialised" not in result.stderr
    names = ["3_0.png", "3_1.png", "7_0.png", "7_1.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess: another thread count may round a logit differently
    try:
        with torch.no_grad():
            indices = bundled.generate([3, 3, 7, 7], cfg_scale=3.0, generator=gen)
            expected = to_uint8(bundled.tokenizer.decode(indices)).permute(0, 2, 3, 1).numpy()
    finally:
        torch.set_num_threads(threads)
    for i, name in enumerate(names):
        assert np.array_equal(np.asarray(Image.open(out / name)), expected[i])


def test_info_describes_the_generator():
    result = wetok("info", "cifar10-ar")
    assert result.returncode == 0, result.stderr
    assert "3,126,144" in result.stdout and "8 x 8 positions x 4 sub-tokens of 4 bits" in result.stdout
    listing = wetok("info").stdout
    assert any(line.split()[:2] == ["cifar10-ar", "generator"] and "bundled" in line for line in listing.splitlines())
    assert any(line.split()[:2] == ["cifar10-tokenizer", "tokenizer"] for line in listing.splitlines())
