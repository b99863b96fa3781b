"""``wetok sample``: class labels -> images, by a WeTok-AR generator and the tokenizer that decodes its tokens."""

from __future__ import annotations

import argparse
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._files import atomic_write
from ..errors import InputError
from ..generation.images import iter_images
from ..generation.model import WeTokAR
from ..model import WeTok
from . import common


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate images of given classes with a WeTok-AR model",
        description="Generate images of the given classes: the generator samples token maps (KV-cached, with "
        "classifier-free guidance when --cfg is not 1), the tokenizer decodes them. Writes one PNG per image "
        "into the output folder (<class>_<k>.png), optionally a grid (one row per class) and an .npz of uint8 "
        "images (N, H, W, 3) under 'arr_0', the layout ImageNet generation evaluators read. All inputs are "
        "checked before anything is written.",
    )
    p.add_argument("classes", nargs="*", metavar="CLASS",
                   help="class labels: numbers and inclusive ranges, e.g. 3 7 10-19 (commas work too); "
                   "default: every class of the model")
    p.add_argument("-o", "--output", required=True, help="output folder for the PNGs")
    p.add_argument("--per-class", type=int, default=1, metavar="N", help="images per listed class (default 1)")
    p.add_argument("--cfg", default="1", metavar="S[,S...]",
                   help="classifier-free guidance scale, one value or one per sub-token (comma-separated, e.g. "
                   "1.75,1.8,2,2); logits = u + s (c - u); 1 = no guidance (default)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely values (default 0: off; 1 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler (and of a generative decoder's noise); samples depend on it and on "
                   "--batch-size (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated per call (default 16)")
    p.add_argument("--grid", nargs="?", const="", default=None, metavar="PATH",
                   help="also write a grid, one row per class (default path: <output>/grid.png)")
    p.add_argument("--npz", default=None, metavar="PATH", help="also write all images as uint8 (N, H, W, 3) "
                   "under 'arr_0' in this .npz")
    g = p.add_argument_group("models")
    g.add_argument("--model", default=None,
                   help="generator: a registered generator name (`wetok info`; its trained weights, or with "
                   "--random-init its configuration), native folder, Hugging Face Hub id, wetok train generator "
                   "checkpoint (.pt or run folder), or official AR .ckpt (with --config); default: the bundled "
                   "CIFAR-10 generator (cifar10-ar)")
    g.add_argument("--config", default=None, help="the GenStage YAML (or a generator preset) of a .ckpt --model")
    g.add_argument("--random-init", action="store_true",
                   help="--model is a registered generator name: build it with random weights (seed 0)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer that decodes the tokens (same forms as the other commands' --model); default: "
                   "the one stored with the generator (its folder's tokenizer/ or the official checkpoint's first "
                   "stage)")
    g.add_argument("--tokenizer-config", default=None, help="the YAML config (or preset) of a .ckpt --tokenizer")
    g.add_argument("--tokenizer-random-init", action="store_true",
                   help="--tokenizer is a registered name: build it with random weights (seed 0)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                   help="precision of the generator (default float32; auto: bfloat16 where the device has native "
                   "bf16 arithmetic); the tokenizer decodes in float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the sampler's step functions")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------- arguments
def parse_classes(specs: list[str], num_classes: int) -> list[int]:
    """``["3", "7", "10-12,20"]`` -> [3, 7, 10, 11, 12, 20], each in [0, num_classes); [] -> every class."""
    if not specs:
        return list(range(num_classes))
    out: list[int] = []
    for part in (s for spec in specs for s in spec.split(",") if s.strip()):
        try:
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise InputError(part, "not a class number or range (e.g. 7 or 10-19)") from None
        if first > last:
            raise InputError(part, "empty class range")
        for c in (first, last):
            if not 0 <= c < num_classes:
                raise InputError(part, f"unknown class {c}: the model has classes 0-{num_classes - 1}")
        out.extend(range(first, last + 1))
    return out


def parse_scales(text: str, groups: int) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",")]
    except ValueError:
        raise InputError("--cfg", f"not a number or comma-separated numbers: {text!r}") from None
    if len(scales) not in (1, groups):
        raise InputError("--cfg", f"{len(scales)} values; give one, or one per sub-token ({groups})")
    return scales * groups if len(scales) == 1 else scales


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[WeTokAR, WeTok]:
    """The generator (in --dtype) and the tokenizer (float32), checked against each other."""
    from ..fast import resolve_dtype
    from ..generation.pretrained import load_generator
    from .models import load_model, random_init_note

    if args.model is None:
        from ..generation import BUNDLED_GENERATOR, BUNDLED_GENERATOR_DIR

        if not (BUNDLED_GENERATOR_DIR / "config.json").is_file():
            raise InputError("--model", "this installation has no bundled generator; name one")
        args.model = BUNDLED_GENERATOR
    ar = load_generator(args.model, args.config, random_init=args.random_init, progress=not args.quiet)
    if args.random_init:
        common.note(args, random_init_note(args.model))
    if args.tokenizer is not None:
        tokenizer = load_model(args.tokenizer, args.tokenizer_config, random_init=args.tokenizer_random_init,
                               progress=not args.quiet)
        if args.tokenizer_random_init:
            common.note(args, random_init_note(args.tokenizer))
    elif args.tokenizer_random_init:
        raise InputError("--tokenizer-random-init", "needs --tokenizer")
    elif ar.tokenizer is not None:
        tokenizer = ar.tokenizer
    else:
        raise InputError(args.model, "has no tokenizer stored with it; pass --tokenizer")
    cfg, tok = ar.config, tokenizer.config
    if (tok.groups, tok.bits_per_group) != (cfg.groups, cfg.bits_per_group):
        raise InputError(args.tokenizer or args.model,
                         f"tokenizer has {tok.groups} groups of {tok.bits_per_group} bits, the generator's tokens "
                         f"have {cfg.groups} sub-tokens of {cfg.bits_per_group} bits")
    dtype = resolve_dtype(args.dtype, device) or torch.float32
    ar = ar.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ar, tokenizer.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    for name in ("per_class", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}", "must be at least 1")
    if not 0 < args.top_p <= 1 or args.temperature < 0:
        raise InputError("--top-p/--temperature", "top-p must be in (0, 1] and temperature >= 0")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if args.npz is not None and Path(args.npz).suffix != ".npz":
        raise InputError(args.npz, "the --npz output must end in .npz")
    grid_path = None if args.grid is None else Path(args.grid) if args.grid else out / "grid.png"
    if grid_path is not None and grid_path.suffix.lower() not in common.IMAGE_OUTPUT_SUFFIXES:
        raise InputError(grid_path, f"unsupported image type (use one of {' '.join(common.IMAGE_OUTPUT_SUFFIXES)})")
    device = common.resolve_device(args.device)
    ar, tokenizer = load_models(args, device)
    cfg = ar.config
    classes = parse_classes(args.classes, cfg.num_classes)
    scales = parse_scales(args.cfg, cfg.groups)
    labels = [c for c in classes for _ in range(args.per_class)]
    seen: dict[int, int] = {}
    names = []
    class_digits = len(str(cfg.num_classes - 1))
    k_digits = len(str(max(Counter(labels).values()) - 1))
    for c in labels:
        k = seen[c] = seen.get(c, -1) + 1
        names.append(f"{c:0{class_digits}d}_{k:0{k_digits}d}.png")
    f = tokenizer.config.downsample_factor
    height, width = cfg.grid_height * f, cfg.grid_width * f
    show = common.show_progress(args)
    batches = iter_images(ar, labels, tokenizer=tokenizer, batch_size=args.batch_size, noise_seed=args.seed,
                          generator=torch.Generator(device).manual_seed(args.seed), progress=show,
                          cfg_scale=scales, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          compile=args.compile)
    keep_for_grid: list[np.ndarray] = []

    def produce(npz_tmp: Path | None) -> None:
        npz = _NpyStream(npz_tmp, (len(labels), height, width, 3)) if npz_tmp is not None else None
        done = 0
        with tqdm(total=len(labels), desc="wetok sample", unit="image", disable=not show) as bar:
            for _, batch in batches:
                images = batch.numpy()
                for image, name in zip(images, names[done:done + len(images)], strict=True):
                    common.save_image(Image.fromarray(image), out / name)
                if npz is not None:
                    npz.write(images)
                if grid_path is not None:
                    keep_for_grid.extend(images)
                done += len(images)
                bar.update(len(images))
        if npz is not None:
            npz.close()

    out.mkdir(parents=True, exist_ok=True)
    if args.npz is not None:
        atomic_write(args.npz, produce, suffix=".npz")
    else:
        produce(None)
    if grid_path is not None:
        common.save_image(_grid(keep_for_grid, labels), grid_path)
    common.note(args, f"wrote {len(labels)} images to {out}")
    return 0


class _NpyStream:
    """Writes one uint8 array of a known shape as ``arr_0.npy`` inside an .npz, a batch at a time (so the whole
    set never has to be in memory); ``np.load(path)["arr_0"]`` reads it."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.entry = self.zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": shape}
        np.lib.format.write_array_header_1_0(self.entry, header)

    def write(self, images: np.ndarray) -> None:
        self.entry.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())

    def close(self) -> None:
        self.entry.close()
        self.zip.close()


def _grid(images: list[np.ndarray], labels: list[int]) -> Image.Image:
    """One row per class (in the order of first appearance), its images left to right."""
    rows: dict[int, list[np.ndarray]] = {}
    for image, c in zip(images, labels, strict=True):
        rows.setdefault(c, []).append(image)
    h, w = images[0].shape[:2]
    cols = max(len(r) for r in rows.values())
    canvas = np.zeros((len(rows) * h, cols * w, 3), dtype=np.uint8)
    for i, row in enumerate(rows.values()):
        for j, image in enumerate(row):
            canvas[i * h:(i + 1) * h, j * w:(j + 1) * w] = image
    return Image.fromarray(canvas)
