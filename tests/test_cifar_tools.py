"""tools/cifar_classifier.py and tools/cifar_gen_eval.py: augmentation, classifier outputs, sample loading, the
Fréchet distance in classifier features and the tokenizer reconstructions, against independent computations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import cifar_classifier as cc  # noqa: E402
import cifar_gen_eval as ge  # noqa: E402

from wetok import WeTok  # noqa: E402


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_to_input_normalises_both_layouts_like_float64_arithmetic() -> None:
    x = _images(3)
    expected = (x.astype(np.float64) / 255.0 - np.array(cc._MEAN)) / np.array(cc._STD)
    expected = expected.transpose(0, 3, 1, 2)
    for layout in (x, x.transpose(0, 3, 1, 2).copy()):
        np.testing.assert_allclose(cc.to_input(layout).numpy(), expected, atol=1e-5)
    with pytest.raises(TypeError):
        cc.to_input(x.astype(np.float32))


def test_augment_is_flip_then_reflect_padded_crop() -> None:
    x = torch.from_numpy(_images(6).transpose(0, 3, 1, 2).astype(np.float32))
    out = cc.augment(x, torch.Generator().manual_seed(3)).numpy()
    g = torch.Generator().manual_seed(3)  # the same draws, in the documented order: flips, rows, columns
    flips = (torch.rand(6, generator=g) < 0.5).numpy()
    dy, dx = torch.randint(0, 9, (6,), generator=g).numpy(), torch.randint(0, 9, (6,), generator=g).numpy()
    for i in range(6):
        image = x[i].numpy()[:, :, ::-1] if flips[i] else x[i].numpy()
        padded = np.pad(image, ((0, 0), (4, 4), (4, 4)), mode="reflect")
        np.testing.assert_array_equal(out[i], padded[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32])


def test_classify_gives_the_model_logits_and_pooled_features_for_any_batch_size() -> None:
    torch.manual_seed(0)
    model = cc.CifarNet().eval()
    with torch.no_grad():  # give BatchNorm non-trivial statistics
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    x = _images(7)
    logits, features = cc.classify(model, x, batch_size=3)
    with torch.no_grad():
        h = model.stages(model.stem(cc.to_input(x)))
        pooled = h.flatten(2).mean(-1)
        direct = pooled @ model.fc.weight.T + model.fc.bias
    assert features.shape == (7, cc.FEATURE_DIM)
    torch.testing.assert_close(features, pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, direct, rtol=0, atol=1e-5)
    torch.testing.assert_close(cc.classify(model, x, batch_size=500)[0], logits, rtol=0, atol=1e-5)


def test_classifier_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = cc.CifarNet().eval()
    torch.save({"model": model.state_dict(), "classes": list(cc.CLASSES)}, tmp_path / "c.pt")
    loaded = cc.load_classifier(tmp_path / "c.pt")
    x = _images(2)
    torch.testing.assert_close(cc.classify(loaded, x)[0], cc.classify(model, x)[0], rtol=0, atol=0)


def test_load_samples_labels_in_class_order_and_refuses_bad_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", arr_0=_images(6))
    images, labels = ge.load_samples(tmp_path / "s.npz", per_class=2)
    assert images.shape == (6, 32, 32, 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    np.savez(tmp_path / "l.npz", arr_0=_images(3), labels=np.array([4, 1, 1]))
    assert ge.load_samples(tmp_path / "l.npz", per_class=None)[1].tolist() == [4, 1, 1]
    with pytest.raises(SystemExit, match="multiple"):
        ge.load_samples(tmp_path / "s.npz", per_class=4)
    np.savez(tmp_path / "f.npz", arr_0=_images(2).astype(np.float32))
    with pytest.raises(SystemExit, match="uint8"):
        ge.load_samples(tmp_path / "f.npz", per_class=None)


def test_fid_in_features_matches_numpy_covariances_and_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 5)), rng.normal(0.3, 1.2, size=(150, 5))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(s1 @ s2))
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(s1 + s2 - 2 * root)
    assert ge.fid(ge.feature_stats(a), ge.feature_stats(b)) == pytest.approx(expected, rel=1e-9)


def test_class_fidelity_counts_per_class() -> None:
    class Fixed(torch.nn.Module):  # a "classifier" whose prediction is the image's first pixel value
        fc = torch.nn.Identity()

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            value = (x[:, 0, 0, 0] * cc._STD[0] + cc._MEAN[0]) * 255
            return torch.nn.functional.one_hot(value.round().long(), 10).float()

        def eval(self) -> Fixed:
            return self

    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = [0, 0, 1, 3]  # predictions
    result = ge.class_fidelity(Fixed(), images, np.array([0, 1, 1, 1]))
    assert result["accuracy"] == 0.5
    assert result["per_class"] == {"airplane": 1.0, "automobile": 1 / 3}


def test_reconstruct_is_the_tokenizer_round_trip_rounded_to_uint8(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = WeTok.from_preset("tiny-f8").eval()
    model.save_pretrained(tmp_path / "tok")
    x = _images(3)
    with torch.no_grad():
        rec = model.reconstruct(torch.from_numpy(x).permute(0, 3, 1, 2).double().div(127.5).sub(1).float())
    expected = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ge.reconstruct(str(tmp_path / "tok"), x, batch_size=2), expected)
