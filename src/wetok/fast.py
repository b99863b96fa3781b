"""Fast inference: one call prepares a model, one context runs it.

    from wetok import WeTok
    from wetok.fast import inference, optimize

    model = optimize(WeTok.from_pretrained(path), device="cpu", dtype="auto", compile=False)
    with inference():
        tokens = model.encode(images)           # images: float32 (B, 3, H, W) in [-1, 1]
        images = model.decode(tokens)            # float32, whatever the compute dtype

What is always on, because outputs stay bit-identical: without autograd the blocks reuse their own buffers
(in-place SiLU, residual add and modulation, see :func:`wetok.blocks.no_autograd`), which removes about half of
the activation-sized allocations. What :func:`optimize` adds, each measured in ``benchmarks/bench_inference.py``:

* ``winograd`` (CPU, float32): the wide 3x3 stride-1 convolutions (>= 128 channels in and out) run either
  NNPACK's Winograd F(6x6, 3x3) kernels (``torch._nnpack_spatial_convolution``, shipped with PyTorch; one image
  at a time, NCHW), which do fewer multiplications, or oneDNN's direct convolution, whichever is faster for that
  layer shape on this machine: timed once per shape and remembered in a per-machine cache file
  (:mod:`wetok._convchoice`; ``WETOK_CONV_CHOICE=rules|winograd|direct`` fixes the choice instead). Which one
  wins depends on the CPU's vector units and on the number of threads, hence the measurement. Winograd rounds
  differently: outputs move by less than 1e-4 over the official f = 16 model, like choosing another cuDNN
  algorithm.
* ``channels_last`` weights for the other convolutions, so they run NHWC (the layout oneDNN and cuDNN prefer)
  without reorders. In float32 on the CPU the GroupNorms of channels_last maps compute their statistics with
  torch reductions (:class:`StableGroupNorm`, the same function): PyTorch's channels_last CPU kernel sums
  naively and takes the variance as E[x^2] - E[x]^2, which is 5e-5 off on a 256x256 map and 5e-4 off when a
  group's mean is 10x its spread (trained models get there); the NCHW kernel is accurate.
* ``dtype``: bfloat16 (or float16 on GPUs) weights and activations. The quantizer always sees a float32 latent
  and decoders return float32 images. ``"auto"`` (:func:`auto_dtypes`) keeps the encoder in float32, so tokens
  are exactly float32's, and runs the decoder in bfloat16 where the hardware has native bf16 arithmetic (CUDA
  with bf16 support; x86 CPUs with AMX or AVX512-BF16), float32 elsewhere. A bf16 decoder moves images by about
  what rounding them to 8 bits does; a bf16 encoder moves latents that lie near zero across the sign threshold,
  so some token indices differ from a float32 encode (many with random weights, whose latents crowd around
  zero; few with trained encoders, which the commitment loss pushes away from zero). BENCHMARKS.md has the
  measured speed and agreement.
* ``compile``: ``torch.compile`` of the encoder and decoder (Inductor; on the CPU with weight freezing, which
  fuses GroupNorm + SiLU and pre-packs the convolution weights). The first call per input shape compiles
  (minutes for the official models on a small CPU). On the 2-core AVX-512 CPU of BENCHMARKS.md it is *slower*
  than the eager fast path (Inductor's GroupNorm reductions over channels_last maps with 1-8 channels per group
  are poorly vectorised), so it is off by default; it is the option for GPUs.

The command line (``encode``, ``decode``, ``reconstruct``, ``eval``) maps ``--device`` / ``--dtype`` /
``--compile`` onto :func:`optimize` (``--no-fast`` skips it) and runs without autograd (``inference_mode``;
``eval`` under ``torch.no_grad``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from . import _cpu
from ._convchoice import choice_mode, measured_choice
from .model import WeTok

__all__ = [
    "DTYPES",
    "StableGroupNorm",
    "WinogradConv2d",
    "auto_dtypes",
    "has_native_bf16",
    "inference",
    "nnpack_available",
    "optimize",
    "resolve_dtype",
]

#: Names accepted for ``dtype`` (``"auto"`` is resolved by :func:`resolve_dtype`, or :func:`auto_dtypes` in
#: :func:`optimize`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` does bfloat16 arithmetic in hardware (rather than emulating it in float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu.has_amx() or _cpu.has_avx512_bf16()
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """A ``dtype`` argument -> a torch dtype; ``None`` stays ``None`` (keep the model's), ``"auto"`` -> bfloat16
    where :func:`has_native_bf16`, else float32 (one dtype for a whole model, e.g. the generator; a tokenizer's
    ``optimize(model, dtype="auto")`` splits encoder and decoder, see :func:`auto_dtypes`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join([*DTYPES, 'auto'])}, got {dtype!r}")
    return DTYPES[dtype]


def auto_dtypes(device: torch.device | str = "cpu") -> tuple[torch.dtype, torch.dtype]:
    """(encoder dtype, decoder dtype) of ``dtype="auto"`` for a tokenizer: the encoder always in float32, so token
    indices are exactly float32's (bfloat16 flips latents that lie near zero); the decoder in bfloat16 where the
    hardware computes in bf16 (:func:`has_native_bf16`: a GPU with bf16, a CPU with AMX or AVX512-BF16), which
    moves decoded images by about as much as rounding them to 8 bits does, else float32."""
    return torch.float32, torch.bfloat16 if has_native_bf16(device) else torch.float32


@functools.cache
def nnpack_available() -> bool:
    """Whether this PyTorch build has NNPACK (calling this also initialises it, which NNPACK needs first)."""
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 :class:`~torch.nn.Conv2d` that, for float32 CPU inference, runs either NNPACK's
    Winograd kernels or oneDNN's direct convolution, whichever is faster for its input shape on this machine
    (see :mod:`wetok._convchoice`: measured once per layer shape and cached per machine and torch version, or
    fixed by ``WETOK_CONV_CHOICE``), and the ordinary convolution otherwise (autograd, other dtypes or devices).
    Same parameters, so :func:`optimize` swaps the class of existing layers that have at least ``MIN_CHANNELS``
    input and output channels. Its weight stays NCHW (what NNPACK reads); for the direct kernel it keeps a
    channels_last copy (rebuilt if the weight changes), so oneDNN does not convert the weight on every call.

    With ``WETOK_CONV_CHOICE=rules`` the choice is fixed: Winograd when in_channels x pixels >= ``MIN_WORK`` and
    the map has ``PIXELS_PER_EXTRA_THREAD`` pixels for every torch thread beyond the first.
    """

    #: The ``rules`` thresholds (official widths, measured on 1 and 2 cores of an AMD Zen 5: below them oneDNN's
    #: direct channels_last convolution is as fast or faster; NNPACK splits a map into 6x6 tiles among threads and
    #: scales poorly on small maps).
    MIN_WORK = 1 << 18
    MIN_CHANNELS = 128
    PIXELS_PER_EXTRA_THREAD = 2048

    def forward(self, x: Tensor) -> Tensor:
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or x.dim() != 4
        ):
            return super().forward(x)
        if self.kernel_choice(x) == "direct":
            return self._direct(x)
        try:
            return self._winograd(x)
        except RuntimeError:  # NNPACK reports no reason; the direct convolution computes the same function
            return self._direct(x)

    def kernel_choice(self, x: Tensor) -> str:
        """``"winograd"`` or ``"direct"``: the kernel :meth:`forward` runs for float32 CPU input ``x``."""
        if not nnpack_available():
            return "direct"
        mode = choice_mode()
        if mode in ("winograd", "direct"):
            return mode
        if mode == "rules":
            pixels = x.shape[-1] * x.shape[-2]
            small = (self.in_channels * pixels < self.MIN_WORK
                     or pixels < self.PIXELS_PER_EXTRA_THREAD * (torch.get_num_threads() - 1))
            return "direct" if small else "winograd"
        # one measurement per size class (batch and pixels rounded to powers of two), so that images of many
        # sizes do not each pay for one; the measurement uses the first input of the class
        batch, pixels = round(math.log2(x.shape[0])), round(math.log2(x.shape[-1] * x.shape[-2]))
        key = (f"conv3x3 {self.in_channels}->{self.out_channels} batch~2^{batch} pixels~2^{pixels} "
               f"float32 threads={torch.get_num_threads()}")

        def kernels() -> dict[str, Callable[[], Tensor]]:
            # Each kernel on its own layout (Winograd NCHW, oneDNN channels_last), whatever the layout x arrived
            # in: a layer's choice sets the layout the next layers receive, so timing both on x's layout would
            # charge Winograd a conversion that a chain of Winograd layers pays once, and a greedy layer-by-layer
            # choice would stay channels_last (measured: 1.29-1.46x instead of 1.55-1.64x at 2 threads, f = 16).
            probe = torch.empty(x.shape, dtype=x.dtype).normal_()
            probe_cl = probe.contiguous(memory_format=torch.channels_last)
            return {"winograd": lambda: self._winograd(probe), "direct": lambda: self._direct(probe_cl)}

        return measured_choice(key, kernels)

    def _direct(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self._channels_last_weight(), self.bias)

    def _winograd(self, x: Tensor) -> Tensor:
        weight = self.weight.contiguous()
        # NNPACK's batched entry point is slower than oneDNN and fails on some shapes; its single-image
        # ("inference") entry point is the fast one, so images go one at a time.
        outs = [torch._nnpack_spatial_convolution(x[i : i + 1].contiguous(), weight, self.bias, [1, 1], [1, 1])
                for i in range(x.shape[0])]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _channels_last_weight(self) -> Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        cached = self.__dict__.get("_channels_last_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.weight.detach().contiguous(memory_format=torch.channels_last))
            self.__dict__["_channels_last_cache"] = cached
        return cached[1]


class StableGroupNorm(nn.GroupNorm):
    """A :class:`~torch.nn.GroupNorm` whose float32 channels_last CPU inputs are normalised with statistics from
    torch reductions (cascade sums; the variance as the mean of squared deviations), output channels_last.

    Hand-written because PyTorch's channels_last CPU kernel is not accurate enough for float32 (see the module
    docstring), and converting to NCHW and back costs twice as much. Other inputs go to the native kernel. Same
    parameters; :func:`optimize` swaps the class of existing layers.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and not x.is_contiguous()):
            return super().forward(x)
        n, c = x.shape[:2]
        per_group = c // self.num_groups

        def to_channels(stat: Tensor) -> Tensor:  # (n, groups, 1) -> (n, c, 1, 1)
            return stat.expand(-1, -1, per_group).reshape(n, c, 1, 1)

        mean = to_channels(x.mean(dim=(2, 3)).view(n, self.num_groups, -1).mean(-1, keepdim=True))
        var = (x - mean).square_().mean(dim=(2, 3)).view(n, self.num_groups, -1).mean(-1, keepdim=True)
        scale = to_channels(torch.rsqrt(var + self.eps))
        if self.affine:
            scale = scale * self.weight.view(1, c, 1, 1)
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias.view(1, c, 1, 1)
        return torch.addcmul(shift, x, scale)


def _winograd_eligible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (3, 3)
        and module.stride == (1, 1)
        and module.padding == (1, 1)
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and min(module.in_channels, module.out_channels) >= WinogradConv2d.MIN_CHANNELS
    )


def optimize(
    model: WeTok,
    *,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype | None = None,
    channels_last: bool = True,
    winograd: bool | None = None,
    compile: bool = False,
) -> WeTok:
    """Prepare ``model`` for fast inference, in place, and return it.

    Puts it in eval mode without gradients, moves it to ``device`` (default: where it is) and casts it to
    ``dtype`` (``None`` keeps its dtype; ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype; ``"auto"``:
    the encoder in float32 and the decoder in the dtype :func:`auto_dtypes` gives, bfloat16 where that pays). ``winograd`` (default: on for float32 on the CPU when NNPACK is available and not compiling) swaps
    the wide 3x3 convolutions for :class:`WinogradConv2d`; ``channels_last`` stores the other convolution weights
    NHWC; ``compile=True`` wraps the encoder and decoder in ``torch.compile``. Parameter
    names, shapes and values are unchanged (except for the dtype cast), so the model still saves and loads as
    before. Run it under :func:`inference`.
    """
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device=torch.device(device))
    param = next(model.parameters())
    if isinstance(dtype, str) and dtype == "auto":
        encode_dtype, decode_dtype = auto_dtypes(param.device)
    else:
        encode_dtype = decode_dtype = resolve_dtype(dtype, param.device)
    for target in (encode_dtype, decode_dtype):
        if target is not None and not target.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {target}")
    if encode_dtype is not None and encode_dtype != param.dtype:
        model.to(dtype=encode_dtype)
    if decode_dtype is not None and decode_dtype != encode_dtype:
        model.decoder.to(dtype=decode_dtype)
    float32 = torch.float32 in (encode_dtype or param.dtype, decode_dtype or param.dtype)
    if winograd is None:
        winograd = param.device.type == "cpu" and float32 and not compile and nnpack_available()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if param.device.type == "cpu" and float32:  # the swapped classes pass other dtypes to the native code
            for module in model.modules():
                if type(module) is nn.GroupNorm:
                    module.__class__ = StableGroupNorm
    if winograd:
        if compile:
            raise ValueError("winograd=True does not combine with compile=True (Inductor has no NNPACK lowering)")
        if not nnpack_available():
            raise RuntimeError("winograd=True needs NNPACK, which this PyTorch build lacks")
        for module in model.modules():
            if _winograd_eligible(module):
                module.__class__ = WinogradConv2d
                module.weight.data = module.weight.data.contiguous()  # NNPACK reads NCHW weights
    if compile:
        _compile(model.encoder, param.device)
        _compile(model.decoder, param.device)
    return model


def _compile(module: nn.Module, device: torch.device) -> None:
    # Freezing turns the (frozen, inference-only) weights into constants, so Inductor can pre-pack them for oneDNN
    # and fold the GroupNorm affine; it applies under inference_mode / no_grad only.
    options = {"freezing": True} if device.type == "cpu" else None
    module.compile(dynamic=False, options=options)


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """The context fast inference runs in: ``torch.inference_mode`` (no autograd bookkeeping, in-place blocks)."""
    with torch.inference_mode():
        yield
