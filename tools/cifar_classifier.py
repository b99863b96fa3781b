"""A small CIFAR-10 classifier, the judge of the class-conditional generator's samples (docs/cifar10-generator.md).

It needs no downloaded network: it is trained here, on the CIFAR-10 training images, in a few minutes on one CPU
thread. Its two uses (``tools/cifar_gen_eval.py``): class fidelity (does it label a sample of class c as c?) and a
Fréchet distance in its penultimate features (a CIFAR-sized stand-in for Inception's FID).

    python tools/cifar_classifier.py --train ../shared/data/cifar10/train --test ../shared/data/cifar10/test \
        -o runs/cifar10-classifier.pt

Python: ``model = load_classifier(path)``; ``logits, features = classify(model, images)`` with ``images`` uint8
(N, 32, 32, 3) or (N, 3, 32, 32).

The network is a ResNet-ish CNN (three stages of 32 / 64 / 128 channels, two residual blocks each except the
first, BatchNorm, global average pooling, a linear layer): written here because torchvision's ResNets are built
for 224 px ImageNet (a 7x7 stride-2 stem and a max-pool would leave a 32x32 image 1x1 after the third stage).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FEATURE_DIM = 128
# channel statistics of the CIFAR-10 training set (the usual normalisation constants)
_MEAN = (0.4914, 0.4822, 0.4465)
_STD = (0.2470, 0.2435, 0.2616)


# ------------------------------------------------------------------------------------------------------- data
def load_folder(root: str | Path, cache: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images (N, 32, 32, 3), int64 labels and the class names of a ``root/<class>/*`` tree (classes in
    sorted order, files sorted). With ``cache`` (an .npz path), read from / write to it."""
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as data:
            return data["images"], data["labels"], [str(c) for c in data["classes"]]
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"{root}: no class folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB"))
            if array.shape != (32, 32, 3):
                raise SystemExit(f"{path}: expected a 32x32 image, got {array.shape[1]}x{array.shape[0]}")
            images.append(array)
            labels.append(label)
    out = np.stack(images), np.asarray(labels, np.int64), classes
    if cache is not None:
        np.savez(cache, images=out[0], labels=out[1], classes=np.asarray(classes))
    return out


def to_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (N, 32, 32, 3) or (N, 3, 32, 32) -> normalised float32 (N, 3, 32, 32)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, 3) or (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: Tensor, generator: torch.Generator, blur: bool = False) -> Tensor:
    """Random horizontal flip and a random 32x32 crop of the 4-pixel reflect-padded image (the usual CIFAR
    augmentation), per image. ``blur``: also blur a random half of the batch with a Gaussian (5x5, sigma drawn
    from [0.4, 1.2] per batch), so that the classifier judges the content of blurry images (decoded tokens)
    rather than their blur."""
    n = x.shape[0]
    if blur:
        sigma = 0.4 + 0.8 * float(torch.rand((), generator=generator))
        blurred = TF.gaussian_blur(x, [5, 5], [sigma, sigma])
        pick = (torch.rand(n, generator=generator) < 0.5).view(n, 1, 1, 1)
        x = torch.where(pick, blurred, x)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(32)).view(n, 1, 32, 1).expand(n, 3, 32, 40)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(32)).view(n, 1, 1, 32).expand(n, 3, 32, 32)
    return out.gather(3, cols)


# ------------------------------------------------------------------------------------------------------ model
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.skip is None else self.skip(x)))


class CifarNet(nn.Module):
    """Stem conv 32 -> stages (32 @ 32x32, 64 @ 16x16, 128 @ 8x8) -> average pool -> linear (10 classes)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, FEATURE_DIM)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.Sequential(
            _Block(widths[0], widths[0], 1),
            _Block(widths[0], widths[1], 2), _Block(widths[1], widths[1], 1),
            _Block(widths[1], widths[2], 2), _Block(widths[2], widths[2], 1),
        )
        self.fc = nn.Linear(widths[2], num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The penultimate features: the pooled output of the last stage, (N, 128)."""
        return self.stages(self.stem(x)).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def load_classifier(path: str | Path) -> CifarNet:
    """A trained classifier (the file written by this script), in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = CifarNet(num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def classify(model: CifarNet, images: np.ndarray | Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Logits (N, 10) and penultimate features (N, 128), float32, of uint8 images (N, 32, 32, 3) or
    (N, 3, 32, 32). The model runs in eval mode and float32."""
    model.eval()
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        f = model.forward_features(to_input(images[start:start + batch_size]))
        features.append(f)
        logits.append(model.fc(f))
    return torch.cat(logits), torch.cat(features)


def accuracy(model: CifarNet, images: np.ndarray, labels: np.ndarray) -> float:
    logits, _ = classify(model, images)
    return float((logits.argmax(1).numpy() == labels).mean())


# ------------------------------------------------------------------------------------------------------ train
def train(model: CifarNet, images: np.ndarray, labels: np.ndarray, *, epochs: int, batch_size: int, lr: float,
          seed: int, log: list[dict], blur: bool = False) -> None:
    """SGD with Nesterov momentum, one-cycle-like schedule (linear warm-up over the first 15% of steps, then
    cosine decay to zero), label smoothing 0.1, bf16 autocast (float32 on CPUs without native bf16 is slower
    but the same recipe)."""
    generator = torch.Generator().manual_seed(seed)
    x_all = to_input(images)
    y_all = torch.as_tensor(labels)
    n = len(x_all)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    warm = max(1, int(0.15 * total))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    step, t0 = 0, time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        running, seen = 0.0, 0
        for k in range(steps_per_epoch):
            idx = order[k * batch_size:(k + 1) * batch_size]
            x = augment(x_all[idx], generator, blur)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = F.cross_entropy(out.float(), y_all[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
        log.append({"epoch": epoch + 1, "step": step, "train_loss": running / seen, "seconds": time.time() - t0})
        print(f"epoch {epoch + 1}/{epochs}: loss {running / seen:.4f}, {time.time() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training images, <class>/*.jpg")
    parser.add_argument("--test", required=True, help="test images, <class>/*.jpg")
    parser.add_argument("-o", "--output", required=True, help="where to write the weights (.pt)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blur", action="store_true", help="blur augmentation (see augment)")
    parser.add_argument("--init", help="start from these weights (a file this script wrote): fine-tuning")
    parser.add_argument("--cache", help="folder for .npz copies of the decoded image sets")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    x_train, y_train, classes = load_folder(args.train, cache / "cifar10-train.npz" if cache else None)
    x_test, y_test, test_classes = load_folder(args.test, cache / "cifar10-test.npz" if cache else None)
    if classes != test_classes:
        sys.exit(f"class folders differ: {classes} vs {test_classes}")
    model = load_classifier(args.init).train() if args.init else CifarNet(num_classes=len(classes))
    log: list[dict] = []
    t0 = time.time()
    train(model, x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          log=log, blur=args.blur)
    train_seconds = time.time() - t0
    acc = accuracy(model, x_test, y_test)
    params = sum(p.numel() for p in model.parameters())
    report = {"test_accuracy": acc, "test_images": len(x_test), "train_images": len(x_train),
              "epochs": args.epochs, "blur": args.blur, "init": args.init, "lr": args.lr, "train_seconds": train_seconds, "parameters": params, "log": log}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"model": model.state_dict(), "classes": classes, "report": report}, tmp)
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"test accuracy {acc:.4f} on {len(x_test)} images; {params:,} parameters; {train_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
