"""``wetok sample``: class labels -> images, by a WeTok-AR generator and the tokenizer that decodes its tokens."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._files import atomic_write
from ..errors import InputError
from ..generation.images import iter_images
from ..generation.model import WeTokAR
from ..model import WeTok
from ..token_shards import shown
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
    common.add_device_option(g)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                   help="precision of the generator (default float32; auto: bfloat16 where the device has native "
                   "bf16 arithmetic); the tokenizer decodes in float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the sampler's step functions")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------- arguments
#: Most images one run makes (more: several runs with other --seed values into other folders).
MAX_IMAGES = 1_000_000
#: Largest --batch-size, and most memory the sampler's key / value caches of one batch may take (also at most a
#: quarter of the machine's memory, or 80% of a GPU's free memory).
MAX_BATCH = 4096
MAX_CACHE_BYTES = 16 << 30
#: --seed range (seeds of later batches' decoder noise add the image number to it).
MAX_SEED = 1 << 62
#: --cfg scales and non-zero --temperature values must lie in these ranges.
CFG_RANGE = (0.0, 100.0)
TEMPERATURE_RANGE = (1e-3, 1e3)
#: Largest grid image (pixels), when Pillow's decompression-bomb limit is switched off.
DEFAULT_MAX_GRID_PIXELS = 89_478_485


def class_ranges(specs: list[str]) -> list[tuple[int, int]]:
    """``["3", "7", "10-12,20"]`` -> [(3, 3), (7, 7), (10, 12), (20, 20)]: the syntax only."""
    out = []
    for part in (s.strip() for spec in specs for s in spec.split(",") if s.strip()):
        lo, _, hi = part.partition("-")
        if not (lo.isdecimal() and (hi == "" or hi.isdecimal())) or len(part) > 40:
            raise InputError(shown(part), "not a class number or range (e.g. 7 or 10-19)")
        first, last = int(lo), int(hi or lo)
        if first > last:
            raise InputError(part, "empty class range")
        out.append((first, last))
    return out


def parse_classes(specs: list[str], num_classes: int, limit: int = MAX_IMAGES) -> list[int]:
    """``["3", "7", "10-12,20"]`` -> [3, 7, 10, 11, 12, 20], each in [0, num_classes); [] -> every class.
    More than ``limit`` classes in all is refused before any list is made."""
    ranges = class_ranges(specs) or [(0, num_classes - 1)]
    for first, last in ranges:
        for c in (first, last):
            if not 0 <= c < num_classes:
                raise InputError(f"{first}-{last}" if first != last else str(c),
                                 f"unknown class {c}: the model has classes 0-{num_classes - 1}")
    total = sum(last - first + 1 for first, last in ranges)
    if total > limit:
        raise InputError("CLASS", f"{total} classes listed, over the limit of {limit} images per run")
    return [c for first, last in ranges for c in range(first, last + 1)]


def parse_scales(text: str, groups: int | None = None) -> list[float]:
    """``--cfg``: one scale or one per sub-token, each finite and within :data:`CFG_RANGE`; with ``groups``,
    one per sub-token (a single value repeated)."""
    try:
        scales = [float(s) for s in text.split(",", 64)]
    except ValueError:
        raise InputError("--cfg", f"not a number or comma-separated numbers: {shown(text)!r}") from None
    lo, hi = CFG_RANGE
    if not all(lo <= s <= hi for s in scales):  # also refuses nan
        raise InputError("--cfg", f"scales must be numbers from {lo:g} to {hi:g}, got {shown(text)}")
    if groups is None:
        return scales
    if len(scales) not in (1, groups):
        raise InputError("--cfg", f"{len(scales)} values; give one, or one per sub-token ({groups})")
    return scales * groups if len(scales) == 1 else scales


def check_options(args: argparse.Namespace) -> None:
    """Everything about the options that needs no model, before any model is loaded."""
    for name, top in (("per_class", MAX_IMAGES), ("batch_size", MAX_BATCH)):
        value = getattr(args, name)
        if not 1 <= value <= top:
            raise InputError(f"--{name.replace('_', '-')}", f"must be from 1 to {top}, got {shown(value, 30)}")
    if not 0 <= args.seed <= MAX_SEED:
        raise InputError("--seed", f"must be from 0 to 2^62, got {shown(args.seed, 30)}")
    lo, hi = TEMPERATURE_RANGE
    if not (args.temperature == 0 or lo <= args.temperature <= hi):
        raise InputError("--temperature", f"must be 0 (greedy) or from {lo:g} to {hi:g}, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise InputError("--top-p", f"must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise InputError("--top-k", f"must be >= 0 (0: off), got {args.top_k}")
    parse_scales(args.cfg)
    class_ranges(args.classes)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if args.npz is not None and Path(args.npz).suffix != ".npz":
        raise InputError(args.npz, "the --npz output must end in .npz")
    grid_path = _grid_path(args)
    if grid_path is not None and grid_path.suffix.lower() not in common.IMAGE_OUTPUT_SUFFIXES:
        raise InputError(grid_path, f"unsupported image type (use one of {' '.join(common.IMAGE_OUTPUT_SUFFIXES)})")
    for path in (out, grid_path, None if args.npz is None else Path(args.npz)):
        if path is not None:
            _check_writable(path)


def _grid_path(args: argparse.Namespace) -> Path | None:
    return None if args.grid is None else Path(args.grid) if args.grid else Path(args.output) / "grid.png"


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(path: Path) -> None:
    """Refuse an output whose nearest existing folder is not a writable folder (checked before any work)."""
    folder = _existing_parent(path if not path.is_file() else path.parent)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot write here ({folder} is not a writable folder)")


def check_work(args: argparse.Namespace, ar: WeTokAR, classes: list[int], height: int, width: int) -> None:
    """Limits that need the model: --top-k, the number of images, the key / value cache of a batch, the grid
    image and the --npz file against the free disk space."""
    cfg = ar.config
    if args.top_k > cfg.vocab_size:
        raise InputError("--top-k", f"must be at most the {cfg.vocab_size} values of a sub-token, got {args.top_k}")
    total = len(classes) * args.per_class
    if total > MAX_IMAGES:
        raise InputError("--per-class", f"{len(classes)} classes x {args.per_class} = {total} images, over the "
                                        f"limit of {MAX_IMAGES} per run")
    rows = min(args.batch_size, total) * (2 if any(s != 1 for s in parse_scales(args.cfg)) else 1)
    itemsize = next(ar.parameters()).element_size()
    cache = 2 * rows * cfg.dim * itemsize * (cfg.spatial_layers * cfg.num_positions + cfg.intra_layers * cfg.groups)
    limit = cache_limit(next(ar.parameters()).device)
    if cache > limit:
        raise InputError("--batch-size", f"{args.batch_size} needs {cache / 2**30:.1f} GiB of key / value cache, "
                                         f"over the limit of {limit / 2**30:.1f} GiB here; lower it")
    if _grid_path(args) is not None:
        pixels = len(set(classes)) * max(Counter(classes).values()) * args.per_class * height * width
        limit = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_GRID_PIXELS
        if pixels > limit:
            raise InputError("--grid", f"the grid would have {pixels} pixels, over the {limit}-pixel limit; "
                                       "ask for fewer images or drop --grid")
    if args.npz is not None:
        need = total * height * width * 3 + (1 << 16)
        free = shutil.disk_usage(_existing_parent(Path(args.npz))).free
        if need > free:
            raise InputError(args.npz, f"needs {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB are free there")


def cache_limit(device: torch.device) -> int:
    """Most bytes the key / value caches of one batch may take on ``device`` (see :data:`MAX_CACHE_BYTES`)."""
    if device.type == "cuda":
        return min(MAX_CACHE_BYTES, int(torch.cuda.mem_get_info(device)[0] * 0.8))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return MAX_CACHE_BYTES
    return min(MAX_CACHE_BYTES, memory // 4)


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
        raise InputError(shown(args.model, 200), "has no tokenizer stored with it; pass --tokenizer")
    cfg, tok = ar.config, tokenizer.config
    if (tok.groups, tok.bits_per_group) != (cfg.groups, cfg.bits_per_group):
        raise InputError(shown(args.tokenizer or args.model, 200),
                         f"tokenizer has {tok.groups} groups of {tok.bits_per_group} bits, the generator's tokens "
                         f"have {cfg.groups} sub-tokens of {cfg.bits_per_group} bits")
    dtype = resolve_dtype(args.dtype, device) or torch.float32
    ar = ar.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ar, tokenizer.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    check_options(args)
    device = common.resolve_device(args.device)
    ar, tokenizer = load_models(args, device)
    cfg = ar.config
    classes = parse_classes(args.classes, cfg.num_classes)
    scales = parse_scales(args.cfg, cfg.groups)
    f = tokenizer.config.downsample_factor
    height, width = cfg.grid_height * f, cfg.grid_width * f
    check_work(args, ar, classes, height, width)
    labels = [c for c in classes for _ in range(args.per_class)]
    show = common.show_progress(args)
    batches = iter_images(ar, labels, tokenizer=tokenizer, batch_size=args.batch_size, noise_seed=args.seed,
                          generator=torch.Generator(device).manual_seed(args.seed), progress=show,
                          cfg_scale=scales, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          compile=args.compile)
    out = Path(args.output)
    made_out = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".wetok-sample-", dir=out))
    except OSError as err:
        raise InputError(out, f"cannot create the output folder ({err.strerror or err})") from None
    try:
        names = _write_all(args, batches, labels, cfg.num_classes, (height, width), tmp, show)
        for name in names:  # every file is complete: move them into place
            os.replace(tmp / name, out / name)
    except OSError as err:
        raise InputError(err.filename or out, f"cannot write ({err.strerror or err})") from None
    except (MemoryError, torch.OutOfMemoryError):
        raise InputError("--batch-size", f"{args.batch_size}: out of memory while sampling; lower it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    common.note(args, f"wrote {len(labels)} images to {out}")
    return 0


def _write_all(args: argparse.Namespace, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], labels: list[int],
               num_classes: int, size: tuple[int, int], tmp: Path, show: bool) -> list[str]:
    """Write every PNG into ``tmp`` and, when asked, the --npz and then the grid (each atomically); return the
    names written into ``tmp``."""
    from tqdm.auto import tqdm

    counts = Counter(labels)
    class_digits, k_digits = len(str(num_classes - 1)), len(str(max(counts.values()) - 1))
    grid_path = _grid_path(args)
    rows = {c: i for i, c in enumerate(dict.fromkeys(labels))}  # one row per class, in order of appearance
    height, width = size
    names: list[str] = []

    canvas = None  # allocated once, within the limit checked by check_work
    if grid_path is not None:
        canvas = np.zeros((len(rows) * height, max(counts.values()) * width, 3), dtype=np.uint8)

    def produce(npz_tmp: Path | None) -> None:
        npz = _NpyStream(npz_tmp, (len(labels), height, width, 3)) if npz_tmp is not None else None
        seen: dict[int, int] = {}
        with tqdm(total=len(labels), desc="wetok sample", unit="image", disable=not show) as bar:
            for batch_labels, batch in batches:
                images = batch.numpy()
                for image, c in zip(images, batch_labels.tolist(), strict=True):
                    k = seen[c] = seen.get(c, -1) + 1
                    name = f"{c:0{class_digits}d}_{k:0{k_digits}d}.png"
                    Image.fromarray(image).save(tmp / name)
                    names.append(name)
                    if canvas is not None:
                        r = rows[c]
                        canvas[r * height:(r + 1) * height, k * width:(k + 1) * width] = image
                if npz is not None:
                    npz.write(images)
                bar.update(len(images))
        if npz is not None:
            npz.close()

    if args.npz is not None:
        atomic_write(args.npz, produce, suffix=".npz")
    else:
        produce(None)
    if canvas is not None:
        common.save_image(Image.fromarray(canvas), grid_path)
    return names


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
