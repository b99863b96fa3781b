"""What the image commands share: model options, input expansion and output naming, batch runs, image saving.

The image steps themselves (decode any file to RGB, optional ``--size`` resize, padding to a multiple of f with
``--pad-mode``, tiling, cropping back) are the library's :mod:`wetok.pipeline`; the commands are its clients.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._files import atomic_write
from ..config import WeTokConfig
from ..errors import InputError, describe_error, printable
from ..fast import DTYPES
from ..image import PAD_MODES
from ..model import WeTok
from ..pipeline import AUTO_TILE, AUTO_TILE_PIXELS
from .models import FALLBACK_MODEL  # noqa: F401  (re-exported: used when there is no bundled model)
from .options import (  # noqa: F401  (re-exported: the commands' option types)
    DEVICE_TYPES,
    MAX_INT_OPTION,
    MAX_SEED,
    Parser,
    add_device_option,
    add_max_pixels_option,
    add_seed_option,
    apply_max_pixels,
    device_type,
    float_range,
    int_range,
    nonnegative_int,
    positive_int,
    seed_type,
)

TOKEN_SUFFIXES = (".json", ".wtok")
IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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
    add_device_option(g)
    if not speed:
        g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model precision (default float32)")
        return
    g.add_argument("--dtype", choices=[*sorted(DTYPES), "auto"], default="float32",
                   help="compute precision (default float32: the same output on every machine). auto: the encoder "
                   "in float32 (exact tokens) and the decoder in bfloat16 where the device computes bf16 natively "
                   "(GPUs, AMX or AVX512-BF16 CPUs), else float32; bfloat16: the whole model, which changes some "
                   "tokens (README, Precision)")
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
        p.add_argument("--tile", type=int_range(0, 65536), default=None, metavar="PIXELS",
                       help=f"process in overlapping tiles of this many pixels to bound memory; 0 = never; "
                       f"default: tiles of {AUTO_TILE} for images over {AUTO_TILE_PIXELS} pixels")


def add_image_options(p: argparse.ArgumentParser) -> None:
    """--size, --pad-mode and --max-pixels."""
    p.add_argument("--size", type=int_range(1, 65536), default=None, metavar="S",
                   help="resize so the short side is S pixels (bicubic) before encoding; default: keep the size")
    p.add_argument("--pad-mode", choices=PAD_MODES, default="replicate",
                   help="how images are padded to a multiple of f, split evenly between opposite sides (default "
                   "replicate: repeat the edge pixels; reflect: mirror; constant: mid-grey)")
    add_max_pixels_option(p)


def note(args: argparse.Namespace, message: str) -> None:
    """A line on stderr (non-printable characters escaped), unless --quiet."""
    if not getattr(args, "quiet", False):
        print(printable(message), file=sys.stderr)


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
    from ..fast import auto_dtypes, optimize, resolve_dtype
    from .models import load_model, random_init_note

    given = args.model is not None
    spec = model_spec(args)
    random_init = bool(getattr(args, "random_init", False))
    device = resolve_device(args.device)
    model = load_model(spec, args.config, random_init=random_init, progress=not getattr(args, "quiet", False))
    if random_init and given:
        note(args, random_init_note(spec))
    model.weights_id  # noqa: B018  (computed now, on the loaded float32 weights, before any dtype change)
    if getattr(args, "fast", False):  # optimize splits "auto": float32 encoder, bf16 decoder where native
        return optimize(model, device=device, dtype=args.dtype, compile=args.compile), spec
    if getattr(args, "compile", False):
        raise InputError("--compile", "does not combine with --no-fast")
    if args.dtype == "auto":
        encoder_dtype, decoder_dtype = auto_dtypes(device)
        model = model.to(device=device, dtype=encoder_dtype).eval()
        model.decoder.to(dtype=decoder_dtype)
    else:
        model = model.to(device=device, dtype=resolve_dtype(args.dtype, device)).eval()
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


def _component_regex(component: str) -> str:
    """One path component of a glob pattern -> a regex that never crosses "/" (``*``, ``?``, ``[...]``)."""
    out, i = [], 0
    while i < len(component):
        c = component[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and component.find("]", i + 2) > 0:
            end = component.find("]", i + 2)  # a "]" right after "[" is a member of the set
            body = component[i + 1:end].replace("\\", "\\\\")
            out.append(f"[^{body[1:]}]" if body.startswith("!") else f"[{body}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_files(pattern: str, on_error: Callable[[OSError], object] | None = None) -> list[Path]:
    """Files matching a glob pattern, sorted. ``**`` (any number of folders) is matched over
    :func:`wetok.data.walk_files`, which follows symlinked folders but ends on symlink loops (the standard
    library's recursive glob does not); patterns without ``**`` use :func:`glob.glob`. Hidden names never match."""
    from ..data import walk_files

    if "**" not in pattern:
        return sorted(map(Path, glob.glob(pattern)))
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    rest = parts[first:]
    regex = ""
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        if part == "**":
            regex += "(?:[^/]+/)*[^/]+" if last else "(?:[^/]+/)*"
        else:
            regex += _component_regex(part) + ("" if last else "/")
    matcher = re.compile(regex)
    if not os.path.isdir(base):
        return []
    return sorted(p for p in walk_files(base, on_error) if matcher.fullmatch(os.path.relpath(p, base)))


def expand_inputs(specs: Sequence[str], kind: str, tags: Sequence[str] = ("",)) -> tuple[list[Item], list[str]]:
    """Files, directories (searched recursively) and glob patterns -> (items, error messages).

    ``kind`` is "image" (directories are searched with :func:`wetok.data.find_images`) or "tokens" (``.json`` and
    ``.wtok`` files). Explicitly named files are taken whatever their suffix, so decoding decides whether they
    are readable. Outputs of a directory's files keep their path relative to it; inputs whose output names would
    collide get distinct ones (:func:`distinct_names`; ``tags`` are the endings each item's outputs add).
    Folders are walked by :func:`wetok.data.walk_files` (symlinks followed, loops ended); a sub-folder that cannot
    be listed is one error message, and the other files are still taken.
    """
    from ..data import is_image_name, walk_files

    items: list[Item] = []
    errors: list[str] = []
    seen: set[Path] = set()

    def unlistable(err: OSError) -> None:
        errors.append(describe_error(err))

    def add(path: Path, name: str) -> None:
        try:
            key = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop, an unsearchable folder: reported when it is read
            key = path.absolute()
        if key not in seen:
            seen.add(key)
            items.append(Item(path, name))

    def add_dir(root: Path) -> None:
        def keep(p: Path) -> bool:  # (image readers refuse what is not a regular file themselves)
            return is_image_name(p.name) if kind == "image" else p.name.lower().endswith(TOKEN_SUFFIXES) and p.is_file()

        before = len(errors)
        found = sorted((p for p in walk_files(root, unlistable) if keep(p)),
                       key=lambda p: p.relative_to(root).as_posix())
        if not found and len(errors) == before:  # (an unlistable folder is already one message)
            what = "image files" if kind == "image" else f"token files ({' '.join(TOKEN_SUFFIXES)})"
            raise InputError(root, f"no {what} under this folder")
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
                matches = glob_files(spec, unlistable)
                if not matches:
                    raise InputError(spec, "no file matches this pattern")
                for m in matches:
                    add_dir(m) if m.is_dir() else add(m, m.stem)
        except Exception as err:  # noqa: BLE001  one bad input is one message; the others go on
            errors.append(describe_error(err, spec))
    return distinct_names(items, tags), errors


def distinct_names(items: Sequence[Item], tags: Sequence[str] = ("",)) -> list[Item]:
    """Rename items whose outputs would share a file, so that no output overwrites another.

    An item writes ``name + tag`` for each of ``tags`` (reconstruct: ``""`` and ``"_grid"``). Names are compared
    case-insensitively (macOS and Windows file systems are). Items whose names clash keep their input's ending in
    the name (``a.png``, ``a.jpg`` -> ``a.png.json``, ``a.jpg.json``); if that still clashes (``a.png`` and
    ``a.PNG``), ``-2``, ``-3``, ... are added in input order. Other items keep their names.
    """
    def keys(name: str) -> set[str]:
        return {(name + tag).casefold() for tag in tags}

    counts: dict[str, int] = {}
    for item in items:
        for key in keys(item.name):
            counts[key] = counts.get(key, 0) + 1
    used: set[str] = set()
    out: list[Item] = []
    for item in items:
        name = item.name
        if any(counts[key] > 1 for key in keys(name)):
            name = f"{name}{item.path.suffix}"
        base, n = name, 1
        while keys(name) & used:
            n += 1
            name = f"{base}-{n}"
        used |= keys(name)
        out.append(item if name == item.name else Item(item.path, name))
    return out


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
def save_image(image: Image.Image, path: Path) -> None:
    """Save through a temporary file in the same folder, renamed into place."""
    if path.suffix.lower() not in IMAGE_OUTPUT_SUFFIXES:
        raise InputError(path, f"unsupported output image type (use one of {' '.join(IMAGE_OUTPUT_SUFFIXES)})")
    atomic_write(path, image.save, suffix=path.suffix)


# --------------------------------------------------------------------------------------------------- batch runs
def run_batch(args: argparse.Namespace, items: Sequence[Item], errors: list[str],
              work: Callable[[Item], None], unit: str = "image") -> int:
    """Run ``work`` on every item with a progress bar; a failed item is reported and the run goes on.

    The expansion ``errors``, then each item's failure (any exception: a :class:`WetokError`'s message, a
    file-system error as "file: reason", anything else with its type), are printed as they happen, one line each
    on stderr, followed by "N of M inputs failed" when there were several inputs; the exit code is 2 if anything
    failed, else 0. Ctrl-C and SIGTERM stop the run.
    """
    from tqdm.auto import tqdm

    total = len(items) + len(errors)
    failed = 0

    def report(message: str) -> None:
        nonlocal failed
        failed += 1
        tqdm.write(f"wetok {args.command}: error: {printable(message)}", file=sys.stderr)

    for message in errors:
        report(message)
    for item in tqdm(items, desc=f"wetok {args.command}", unit=unit, disable=not show_progress(args)):
        try:
            work(item)
        except Exception as err:  # noqa: BLE001  every per-input failure is one line, and the batch goes on
            message = describe_error(err, item.path)
            report(message if message.startswith(printable(item.path)) else f"{item.path}: {message}")
    if failed and total > 1 and not args.quiet:
        print(f"wetok {args.command}: {failed} of {total} inputs failed", file=sys.stderr)
    return 2 if failed else 0


def abs_error_map(a: Image.Image, b: Image.Image, vmax: float = 64.0, rows: int = 256) -> Image.Image:
    """Mean absolute error over channels of two uint8 RGB images, coloured on [0, vmax] by :func:`colorize`
    (computed ``rows`` rows at a time, so memory stays bounded at any image size)."""
    x, y = np.asarray(a), np.asarray(b)
    out = np.empty(x.shape, dtype=np.uint8)
    for start in range(0, x.shape[0], rows):
        diff = np.abs(x[start:start + rows].astype(np.int16) - y[start:start + rows]).mean(-1)
        out[start:start + rows] = colorize(np.clip(diff / vmax, 0, 1))
    return Image.fromarray(out)


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


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars go to stderr only when it is a terminal and --quiet is not given."""
    return not args.quiet and sys.stderr.isatty()


def init_distributed(args: argparse.Namespace, *, timeout: timedelta | None = None) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL with GPU LOCAL_RANK where there are GPUs,
    else gloo). True when this call created the group, which the caller then destroys; the caller's rank test is
    ``torch.distributed.is_initialized()``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    if torch.cuda.is_available() and args.device in (None, "cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    kwargs = {} if timeout is None else {"timeout": timeout}
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **kwargs)
    return True


def add_inception_option(p: argparse.ArgumentParser) -> None:
    """``--inception-weights``: the FID / IS network's weights file, with the library's offline fallbacks."""
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="local pt_inception-2015-12-05-6726825d.pth (default: $WETOK_INCEPTION_WEIGHTS or the "
        "torch hub cache, downloaded if missing; WETOK_OFFLINE=1 forbids the download)",
    )
