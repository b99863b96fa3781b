"""What the image commands share: model options, input expansion, image preparation, batch runs, atomic writes.

Image pipeline (``encode`` / ``reconstruct``): decode any file to RGB (EXIF orientation applied, see
:func:`wetok.data.load_rgb`), optionally resize the short side to ``--size`` (bicubic), then pad to a multiple of
the model's f with :func:`wetok.image.pad_to_multiple` (``--pad-mode``, default ``replicate``: edge pixels
repeated, split evenly between the two sides, the odd pixel going right / bottom). Decoding crops the padding away
and resizes back to the original size if ``--size`` changed it.
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .._files import atomic_write
from ..config import WeTokConfig
from ..errors import InputError, WetokError
from ..fast import DTYPES
from ..image import PAD_MODES, pad_to_multiple, pil_to_tensor, tensor_to_pil, unpad
from ..model import WeTok
from .models import FALLBACK_MODEL  # noqa: F401  (re-exported: used when there is no bundled model)

TOKEN_SUFFIXES = (".json", ".wtok")
IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
#: Images with more pixels than this are tiled when --tile is not given.
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE = 512


# ------------------------------------------------------------------------------------------------------ options
def add_model_options(p: argparse.ArgumentParser, *, speed: bool = True) -> None:
    """--model, --config, --device, --dtype and, with ``speed``, --compile and --no-fast."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="a registered name (its trained weights, downloaded if needed; `wetok info` lists them), "
                   "native model folder, Hugging Face Hub id, wetok train checkpoint (.pt) or run folder, or "
                   "official .ckpt (with --config); official:<name> is accepted too; default: the bundled model")
    g.add_argument("--random-init", action="store_true",
                   help="use --model's configuration with random weights (seeded) instead of its trained weights")
    g.add_argument("--config", default=None, help="the official YAML config (or a preset name) of a .ckpt --model")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    if not speed:
        g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model precision (default float32)")
        return
    g.add_argument("--dtype", choices=[*sorted(DTYPES), "auto"], default="float32",
                   help="compute precision (default float32). auto: bfloat16 where the device has native bf16 "
                   "arithmetic (AVX512-BF16 / AMX CPUs, recent GPUs), else float32. bfloat16 is 2-3.5x faster on "
                   "such CPUs; its reconstructions agree with float32 to ~48 dB PSNR, but a bfloat16 encoder "
                   "gives a different token at ~1%% of positions, so it is not the default")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and decoder (compiles once per image size; pays off on GPUs, "
                   "slower than the default fast path on small CPUs)")
    g.add_argument("--no-fast", dest="fast", action="store_false",
                   help="run the plain eager model: no channels_last, no Winograd convolutions. Outputs are then "
                   "bit-identical to WeTok.encode / decode of a freshly loaded model (given --tile 0: images over a "
                   "megapixel are tiled by default); the default fast path "
                   "(wetok.fast.optimize) differs from them by < 1e-4 (tokens were identical in every measurement)")


def add_run_options(p: argparse.ArgumentParser, *, tile: bool = True) -> None:
    """--quiet and, for image work, --tile."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, notes or summaries")
    if tile:
        p.add_argument("--tile", type=int, default=None, metavar="PIXELS",
                       help=f"process in overlapping tiles of this many pixels to bound memory; 0 = never; "
                       f"default: tiles of {AUTO_TILE} for images over {AUTO_TILE_PIXELS} pixels")


def add_image_options(p: argparse.ArgumentParser) -> None:
    """--size and --pad-mode."""
    p.add_argument("--size", type=int, default=None, metavar="S",
                   help="resize so the short side is S pixels (bicubic) before encoding; default: keep the size")
    p.add_argument("--pad-mode", choices=PAD_MODES, default="replicate",
                   help="how images are padded to a multiple of f, split evenly between opposite sides (default "
                   "replicate: repeat the edge pixels; reflect: mirror; constant: mid-grey)")


def note(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


# ------------------------------------------------------------------------------------------------------ model
def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise InputError("--device", f"unknown device {device!r} ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", f"{device} requested but CUDA is not available")
    return dev


def model_spec(args: argparse.Namespace) -> str:
    """The --model actually used: the given one, the bundled default, or the random fallback preset."""
    from .models import default_spec, random_init_note

    if args.model is not None:
        return args.model
    default = default_spec()
    if default is not None:
        return default
    args.random_init = True
    note(args, f"note: no bundled default model in this installation; using preset {FALLBACK_MODEL!r}. "
               + random_init_note(FALLBACK_MODEL).removeprefix("note: "))
    return FALLBACK_MODEL


def load_model_from_args(args: argparse.Namespace) -> tuple[WeTok, str]:
    """The model of --model / --config / --random-init on --device in --dtype, ready for inference, and the spec
    it came from (resolved by :func:`wetok.cli.models.load_model`).

    Unless ``--no-fast`` is given (or the command has no speed options), the model goes through
    :func:`wetok.fast.optimize` (channels_last, Winograd convolutions on the CPU in float32, ``--compile``).
    A randomly initialised model is seeded, so that e.g. ``encode`` then ``decode`` use the same weights, and
    announced in one line on stderr (unless --quiet).
    """
    from ..fast import optimize, resolve_dtype
    from .models import load_model, random_init_note

    given = args.model is not None
    spec = model_spec(args)
    random_init = bool(getattr(args, "random_init", False))
    device = resolve_device(args.device)
    model = load_model(spec, args.config, random_init=random_init, progress=not getattr(args, "quiet", False))
    if random_init and given:
        note(args, random_init_note(spec))
    model.weights_id  # noqa: B018  (computed now, on the loaded float32 weights, before any dtype change)
    dtype = resolve_dtype(args.dtype, device)
    if getattr(args, "fast", False):
        return optimize(model, device=device, dtype=dtype, compile=args.compile), spec
    if getattr(args, "compile", False):
        raise InputError("--compile", "does not combine with --no-fast")
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, spec


def config_from_args(args: argparse.Namespace) -> WeTokConfig:
    """Only the :class:`WeTokConfig` of --model, without loading weights where that is possible."""
    from .models import spec_config

    return spec_config(model_spec(args), args.config)


# ------------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Item:
    """One input file and the relative name (no suffix) its outputs get."""

    path: Path
    name: str


def expand_inputs(specs: Sequence[str], kind: str) -> tuple[list[Item], list[str]]:
    """Files, directories (searched recursively) and glob patterns -> (items, error messages).

    ``kind`` is "image" (directories are searched with :func:`wetok.data.find_images`) or "tokens" (``.json`` and
    ``.wtok`` files). Explicitly named files are taken whatever their suffix, so decoding decides whether they
    are readable. Outputs of a directory's files keep their path relative to it.
    """
    from ..data import find_images

    items: list[Item] = []
    errors: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, name: str) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            items.append(Item(path, name))

    def add_dir(root: Path) -> None:
        if kind == "image":
            found = find_images(root)
        else:
            found = sorted(p for p in root.rglob("*") if p.suffix.lower() in TOKEN_SUFFIXES and p.is_file())
            if not found:
                raise InputError(root, f"no token files ({' '.join(TOKEN_SUFFIXES)}) under this folder")
        for p in found:
            add(p, p.relative_to(root).with_suffix("").as_posix())

    for spec in specs:
        try:
            path = Path(spec)
            if path.is_dir():
                add_dir(path)
            elif path.exists() or not glob.has_magic(spec):
                add(path, path.stem)  # a missing file is reported when it is read
            else:
                matches = sorted(glob.glob(spec, recursive=True))
                if not matches:
                    raise InputError(spec, "no file matches this pattern")
                for m in map(Path, matches):
                    add_dir(m) if m.is_dir() else add(m, m.stem)
        except WetokError as err:
            errors.append(str(err))
    return items, errors


def check_output(out: str | Path, count: int, file_suffixes: Iterable[str]) -> None:
    """Refuse ``-o x.json`` (a single file) when there are several inputs, and ``-o existing_file`` likewise."""
    out = Path(out)
    if count > 1 and (out.suffix.lower() in tuple(file_suffixes) or out.is_file()):
        raise InputError(out, f"names one file, but there are {count} inputs; give a folder")


def output_path(out: str | Path, item: Item, count: int, suffix: str, file_suffixes: Iterable[str]) -> Path:
    """Where ``item``'s output goes: ``out`` itself for a single input when it has a file suffix, else inside it."""
    out = Path(out)
    if count == 1 and out.suffix.lower() in tuple(file_suffixes):
        return out
    if out.is_file():
        raise InputError(out, "is a file; with several inputs -o must be a directory")
    return out / f"{item.name}{suffix}"


# ------------------------------------------------------------------------------------------------------ images
@dataclass
class Prepared:
    """An image ready for the model: (1, 3, H, W) in [-1, 1], plus how to undo the resize and padding."""

    pixels: Tensor
    padding: tuple[int, int, int, int]
    original_size: tuple[int, int]


def prepare_image(image: Image.Image, f: int, size: int | None, pad_mode: str) -> Prepared:
    """Resize the short side to ``size`` (if given), convert to [-1, 1] and pad to a multiple of ``f``."""
    original = (image.height, image.width)
    if size is not None:
        if size < 1:
            raise InputError("--size", f"must be a positive number of pixels, got {size}")
        scale = size / min(original)
        new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if new != image.size:
            image = image.resize(new, Image.Resampling.BICUBIC)
    pixels, padding = pad_to_multiple(pil_to_tensor(image)[None], f, pad_mode)
    return Prepared(pixels.contiguous(), tuple(int(p) for p in padding), original)


def finish_image(pixels: Tensor, padding: Sequence[int], original_size: Sequence[int]) -> Image.Image:
    """Model output (1, 3, H, W) -> PIL RGB at the original size: crop the padding, undo the resize (bicubic)."""
    image = tensor_to_pil(unpad(pixels, tuple(padding))[0].float())
    if (image.height, image.width) != tuple(original_size):
        image = image.resize((original_size[1], original_size[0]), Image.Resampling.BICUBIC)
    return image


def tile_tokens(tile: int | None, height: int, width: int, f: int) -> int | None:
    """--tile (pixels) -> tile size in tokens for :mod:`wetok.tiling`, or None to run untiled."""
    if tile is None:
        tile = AUTO_TILE if height * width > AUTO_TILE_PIXELS else 0
    if tile == 0:
        return None
    if tile < 2 * f:
        raise InputError("--tile", f"must be at least {2 * f} pixels (two tokens) for this model, got {tile}")
    return tile // f


def save_image(image: Image.Image, path: Path) -> None:
    """Save through a temporary file in the same folder, renamed into place."""
    if path.suffix.lower() not in IMAGE_OUTPUT_SUFFIXES:
        raise InputError(path, f"unsupported output image type (use one of {' '.join(IMAGE_OUTPUT_SUFFIXES)})")
    atomic_write(path, image.save, suffix=path.suffix)


# --------------------------------------------------------------------------------------------------- batch runs
def run_batch(args: argparse.Namespace, items: Sequence[Item], errors: list[str],
              work: Callable[[Item], None], unit: str = "image") -> int:
    """Run ``work`` on every item with a progress bar; a bad item is recorded and the run goes on.

    Errors (the expansion ``errors`` plus every :class:`WetokError` raised by ``work``) are printed at the end, one
    line each on stderr; the exit code is 2 if there was any, else 0.
    """
    from tqdm.auto import tqdm

    total = len(items) + len(errors)
    errors = list(errors)
    for item in tqdm(items, desc=f"wetok {args.command}", unit=unit, disable=not show_progress(args)):
        try:
            work(item)
        except WetokError as err:
            errors.append(str(err))
    for message in errors:
        print(f"wetok {args.command}: error: {message}", file=sys.stderr)
    if errors and total > 1 and not args.quiet:
        print(f"wetok {args.command}: {len(errors)} of {total} inputs failed", file=sys.stderr)
    return 2 if errors else 0


def abs_error_map(a: Image.Image, b: Image.Image, vmax: float = 64.0) -> Image.Image:
    """Mean absolute error over channels of two uint8 RGB images, coloured on [0, vmax] by :func:`colorize`."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean(-1)
    return Image.fromarray(colorize(np.clip(diff / vmax, 0, 1)))


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB on a black-purple-orange-yellow ramp (brightness rises).

    Linear interpolation between five anchor colours (close to matplotlib's "inferno"); hand-written to avoid a
    matplotlib dependency for one colour map.
    """
    lam = np.clip(np.asarray(values, dtype=np.float64), 0, 1)
    stops = np.linspace(0, 1, len(_RAMP))
    rgb = np.stack([np.interp(lam, stops, _RAMP[:, c]) for c in range(3)], axis=-1)
    return np.rint(rgb).astype(np.uint8)


_RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)


# --------------------------------------------------------------------------------------------------- model steps
def _tile_bar(show: bool, height: int, width: int, f: int, tokens: int, desc: str):
    """A per-tile progress bar for images that take several tiles (the per-file bar says little then)."""
    from tqdm.auto import tqdm

    from ..tiling import tile_count

    total = tile_count(height, width, f, tokens)
    return tqdm(total=total, desc=desc, unit="tile", leave=False, disable=not show or total < 2)


@torch.inference_mode()
def encode_pixels(model: WeTok, pixels: Tensor, tile: int | None, show: bool = False) -> Tensor:
    """(1, 3, H, W) padded pixels -> int64 indices (1, h, w, g) on the CPU, tiled per :func:`tile_tokens`."""
    from ..tiling import encode_tiled

    f = model.downsample_factor
    tokens = tile_tokens(tile, pixels.shape[-2], pixels.shape[-1], f)
    if tokens is None:
        param = next(model.parameters())
        return model.encode(pixels.to(device=param.device, dtype=param.dtype)).indices.cpu()
    with _tile_bar(show, pixels.shape[-2], pixels.shape[-1], f, tokens, "encoding tiles") as bar:
        return encode_tiled(model, pixels, tile=tokens, progress=bar.update)


@torch.inference_mode()
def decode_indices(model: WeTok, indices: Tensor, tile: int | None, seed: int | None, show: bool = False) -> Tensor:
    """Indices (B, h, w, g) -> float32 pixels (B, 3, H, W) on the CPU, not clamped, tiled per :func:`tile_tokens`.

    ``seed`` fixes the generative decoder's noise (drawn on the CPU, so it is the same on every device).
    """
    from ..tiling import decode_tiled

    f = model.downsample_factor
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    height, width = indices.shape[1] * f, indices.shape[2] * f
    tokens = tile_tokens(tile, height, width, f)
    if tokens is None:
        tokens = max(indices.shape[1], indices.shape[2], 2)  # one tile: exactly model.decode, same noise draw
    with _tile_bar(show, height, width, f, tokens, "decoding tiles") as bar:
        return decode_tiled(model, indices, tile=tokens, generator=generator, progress=bar.update)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars go to stderr only when it is a terminal and --quiet is not given."""
    return not args.quiet and sys.stderr.isatty()
