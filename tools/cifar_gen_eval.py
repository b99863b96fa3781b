"""Score class-conditional CIFAR-10 samples with the classifier of ``tools/cifar_classifier.py``.

Two figures that need no downloaded network (docs/cifar10-generator.md):

* class fidelity: the classifier's accuracy on samples of class c labelled c (overall and per class), next to its
  accuracy on the real test images;
* FID in the classifier's penultimate features (128-d): the Fréchet distance between the samples and the real
  test images (``wetok.fid.frechet_distance``). For scale it also reports the same distance between an equal
  number of real training images and the test images (the floor a perfect generator would reach), and with
  ``--tokenizer`` both figures for the tokenizer's reconstructions of the test images (the ceiling that the
  tokenizer puts on any sample made of its tokens).

    python tools/cifar_gen_eval.py SAMPLES --classifier runs/cifar10-classifier.pt \
        --test ../shared/data/cifar10/test --train ../shared/data/cifar10/train --out report.json

SAMPLES is an ``.npz`` with uint8 ``arr_0`` (N, 32, 32, 3) (what ``wetok sample --npz`` writes) whose labels are
its ``labels`` array, or, with ``--per-class K``, K samples of class 0, then K of class 1, ...; or a folder of
``<class>/*.png``. Several SAMPLES (e.g. the guided set for class fidelity and a larger one for FID) can be
given with ``--fid-samples``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_classifier import CLASSES, classify, load_classifier, load_folder  # noqa: E402

from wetok.fid import FeatureStats, frechet_distance  # noqa: E402


def load_samples(path: str | Path, per_class: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images (N, 32, 32, 3) and their labels (None if unknown) from an .npz or a class-folder tree."""
    path = Path(path)
    if path.is_dir():
        images, labels, _ = load_folder(path)
        return images, labels
    if path.suffix != ".npz":
        sys.exit(f"{path}: expected an .npz or a folder")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            sys.exit(f"{path}: no arr_0 array")
        images = data["arr_0"]
        labels = data["labels"].astype(np.int64) if "labels" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        sys.exit(f"{path}: arr_0 must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    if labels is None and per_class:
        if len(images) % per_class:
            sys.exit(f"{path}: {len(images)} images is not a multiple of --per-class {per_class}")
        labels = np.repeat(np.arange(len(images) // per_class), per_class)
    if labels is not None and len(labels) != len(images):
        sys.exit(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def reconstruct(tokenizer_dir: str, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """The tokenizer's reconstructions (encode, quantize, decode; uint8, rounded) of uint8 (N, 32, 32, 3) images."""
    import torch

    from wetok import WeTok
    from wetok.data import to_model_range
    from wetok.image import to_uint8

    model = WeTok.from_pretrained(tokenizer_dir).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_model_range(torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2))
            out.append(to_uint8(model.reconstruct(x)).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def feature_stats(features: np.ndarray) -> FeatureStats:
    stats = FeatureStats.zeros(features.shape[1])
    stats.update(features)
    return stats


def fid(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def class_fidelity(model, images: np.ndarray, labels: np.ndarray) -> dict:
    logits, _ = classify(model, images)
    pred = logits.argmax(1).numpy()
    per_class = {CLASSES[c]: float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    return {"accuracy": float((pred == labels).mean()), "images": int(len(labels)), "per_class": per_class}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", help="guided samples: .npz (arr_0 [+ labels]) or <class>/*.png folder")
    parser.add_argument("--per-class", type=int, help="samples are in class order, this many per class")
    parser.add_argument("--fid-samples", help="another sample set for the FID (default: SAMPLES)")
    parser.add_argument("--fid-per-class", type=int, help="--per-class of --fid-samples")
    parser.add_argument("--classifier", required=True, help="weights written by tools/cifar_classifier.py")
    parser.add_argument("--test", required=True, help="real test images, <class>/*.jpg")
    parser.add_argument("--train", help="real training images, for the real-vs-real FID floor")
    parser.add_argument("--cache", help="folder holding the classifier script's decoded .npz copies")
    parser.add_argument("--tokenizer", help="also score this tokenizer's reconstructions of the test images")
    parser.add_argument("--out", help="JSON report path")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    cache = Path(args.cache) if args.cache else None
    model = load_classifier(args.classifier)
    x_test, y_test, _ = load_folder(args.test, cache / "cifar10-test.npz" if cache else None)
    samples, labels = load_samples(args.samples, args.per_class)
    _, f_test = classify(model, x_test)
    test_stats = feature_stats(f_test.numpy())
    report: dict = {"classifier": str(args.classifier), "samples": str(args.samples)}
    report["real_test"] = class_fidelity(model, x_test, y_test)
    if labels is not None:
        report["samples_fidelity"] = class_fidelity(model, samples, labels)
    fid_images = samples
    if args.fid_samples:
        fid_images, _ = load_samples(args.fid_samples, args.fid_per_class)
        report["fid_samples_file"] = str(args.fid_samples)
    _, f_samples = classify(model, fid_images)
    report["fid_classifier"] = {"value": fid(feature_stats(f_samples.numpy()), test_stats),
                                "samples": int(len(fid_images)), "reference": int(len(x_test))}
    if args.train:
        x_train, _, _ = load_folder(args.train, cache / "cifar10-train.npz" if cache else None)
        pick = np.random.default_rng(0).choice(len(x_train), size=min(len(fid_images), len(x_train)), replace=False)
        _, f_train = classify(model, x_train[np.sort(pick)])
        report["fid_classifier_real_train_vs_test"] = {"value": fid(feature_stats(f_train.numpy()), test_stats),
                                                       "images": int(len(pick))}
    if args.tokenizer:
        rec = reconstruct(args.tokenizer, x_test)
        _, f_rec = classify(model, rec)
        report["tokenizer_reconstructions"] = {
            "tokenizer": str(args.tokenizer), **class_fidelity(model, rec, y_test),
            "fid_classifier": fid(feature_stats(f_rec.numpy()), test_stats)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
