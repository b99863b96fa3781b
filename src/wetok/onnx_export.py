"""The tokenizer as portable graphs with dynamic batch, height and width: ONNX (onnxruntime and other runtimes) or
a torch.export ``ExportedProgram`` (``.pt2``, for PyTorch without the wetok package).

A folder gets two graphs and a ``metadata.json`` that describes them (names, dtypes, shapes, f, groups, bits,
the weights identity, the opset):

* ``encoder``: ``images`` float32 (batch, 3, f*h, f*w) in [-1, 1] -> ``indices`` int64 (batch, h, w, groups),
  the layout of :attr:`wetok.Tokens.indices`, and ``latent`` float32 (batch, groups * bits_per_group, h, w),
  the encoder output before quantization (the indices are its signs, 0 counting as -1, see
  :mod:`wetok.quantizer`).
* ``decoder``: ``indices`` int64 (batch, h, w, groups), plus ``noise`` float32 (batch, groups * bits_per_group,
  h, w) for a generative decoder, -> ``images`` float32 (batch, 3, f*h, f*w), not clamped. The noise is used as
  given: ``WeTok.decode``'s ``noise_scale`` is the caller's multiplication, and zero noise decodes
  deterministically.

h and w must be at least 2: the decoder's adaptive norms take an unbiased variance over the h*w latent
positions, which PyTorch special-cases for a single position and the graphs do not. Indices are not range-checked
inside the graph; only their low ``bits_per_group`` bits are read.

The graphs are traced from a plain float32 CPU copy of the model (the fast path's NNPACK convolutions have no
export), so they compute what ``WeTok.encode`` / ``decode`` compute in float32, to float32 round-off.
TorchScript is not offered: PyTorch deprecated it in favour of torch.export, which ``exported-program`` covers.
ONNX needs the optional packages ``onnx`` and ``onnxscript`` (``pip install 'wetok[onnx]'``, which also brings
``onnxruntime`` to run the graphs).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from ._files import atomic_folder
from .model import WeTok
from .quantizer import codes_to_indices

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "METADATA_NAME",
    "MIN_OPSET",
    "PARTS",
    "DecoderGraph",
    "EncoderGraph",
    "export_graphs",
    "export_onnx",
    "export_program",
    "require_onnx",
]

FORMATS = ("onnx", "exported-program")
PARTS = ("encoder", "decoder")
METADATA_NAME = "metadata.json"
#: ONNX opset of the graphs unless asked otherwise (onnxruntime has run it since 1.14); also the lowest that
#: PyTorch's exporter writes (it quietly keeps 18 when asked for less).
DEFAULT_OPSET = 18
MIN_OPSET = 18
#: Smallest latent height / width the graphs accept (see the module docstring).
MIN_LATENT_SIZE = 2
_SUFFIX = {"onnx": ".onnx", "exported-program": ".pt2"}
_EXAMPLE = (2, 4, 6)  # batch, h, w of the tracing inputs: distinct values, so no dimension is tied to another


def require_onnx() -> None:
    """Raise one ImportError naming the missing packages when the ONNX exporter's dependencies are absent."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs the package{'s' * (len(missing) > 1)} {' and '.join(missing)}: "
                          "pip install 'wetok[onnx]'")


class EncoderGraph(nn.Module):
    """Images -> (indices (B, h, w, g), latent (B, d, h, w)): the traced form of ``WeTok.encode``."""

    def __init__(self, model: WeTok) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.groups = model.config.groups

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.encoder(images)
        return codes_to_indices(latent, self.groups), latent


class DecoderGraph(nn.Module):
    """Indices (B, h, w, g) [+ noise (B, d, h, w)] -> images: the traced form of ``WeTok.decode``.

    Bits are taken with integer division and remainder (what every ONNX runtime has for int64), bit j of a group
    least significant, as :func:`wetok.quantizer.indices_to_codes`.
    """

    def __init__(self, model: WeTok) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.bits_per_group = model.config.bits_per_group
        self.register_buffer("bit_values", 2 ** torch.arange(self.bits_per_group), persistent=False)

    def forward(self, indices: Tensor, noise: Tensor | None = None) -> Tensor:
        b, h, w, g = indices.shape
        bits = torch.remainder(torch.div(indices.unsqueeze(-1), self.bit_values, rounding_mode="floor"), 2)
        codes = (bits.to(torch.float32) * 2 - 1).reshape(b, h, w, g * self.bits_per_group).permute(0, 3, 1, 2)
        return self.decoder(codes) if noise is None else self.decoder(codes, noise)


def plain_float32_copy(model: WeTok) -> WeTok:
    """A float32 CPU copy of ``model`` built from its configuration: plain layers whatever :func:`wetok.fast.optimize`
    did to ``model``, same weights (a bfloat16 model's weights widened)."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        plain = WeTok(model.config)
    plain.load_state_dict(state, assign=True)
    plain.name_or_path = model.name_or_path
    return plain.eval().requires_grad_(False)


def _specs(model: WeTok) -> dict[str, dict[str, Any]]:
    """Per graph: its module, tracing inputs, dynamic shapes and the input / output descriptions."""
    cfg, f = model.config, model.downsample_factor
    d = cfg.groups * cfg.bits_per_group
    batch, h, w = Dim("batch", min=1), Dim("h", min=MIN_LATENT_SIZE), Dim("w", min=MIN_LATENT_SIZE)
    n, hh, ww = _EXAMPLE
    gen = torch.Generator().manual_seed(0)
    latent_shape = ["batch", d, "h", "w"]
    image_shape = ["batch", 3, f"{f}*h", f"{f}*w"]
    indices_shape = ["batch", "h", "w", cfg.groups]
    dec_args: tuple[Tensor, ...] = (torch.randint(0, 2**cfg.bits_per_group, (n, hh, ww, cfg.groups), generator=gen),)
    dec_dynamic: dict[str, Any] = {"indices": {0: batch, 1: h, 2: w}}
    dec_inputs = [("indices", "int64", indices_shape)]
    if cfg.generative_decoder:
        dec_args += (torch.randn(n, d, hh, ww, generator=gen),)
        dec_dynamic["noise"] = {0: batch, 2: h, 3: w}
        dec_inputs.append(("noise", "float32", latent_shape))
    return {
        "encoder": dict(
            module=EncoderGraph(model), args=(torch.rand(n, 3, hh * f, ww * f, generator=gen) * 2 - 1,),
            dynamic={"images": {0: batch, 2: f * h, 3: f * w}},
            inputs=[("images", "float32", image_shape)],
            outputs=[("indices", "int64", indices_shape), ("latent", "float32", latent_shape)],
        ),
        "decoder": dict(module=DecoderGraph(model), args=dec_args, dynamic=dec_dynamic, inputs=dec_inputs,
                        outputs=[("images", "float32", image_shape)]),
    }


def _trace(spec: dict[str, Any]) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(spec["module"].eval(), spec["args"], dynamic_shapes=spec["dynamic"], strict=False)


def _save_onnx(program: torch.export.ExportedProgram, spec: dict[str, Any], path: Path, opset: int) -> int:
    """Convert and save; returns the opset the graph has."""
    import onnx_ir as ir

    with warnings.catch_warnings():
        # the exporter notes that dimensions shared by several inputs keep one name: what is meant here
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        onnx_program = torch.onnx.export(
            program, spec["args"], dynamo=True, opset_version=opset, verbose=False,
            input_names=[name for name, _, _ in spec["inputs"]],
            output_names=[name for name, _, _ in spec["outputs"]],
        )
    assert onnx_program is not None
    # the exporter names the sizes of a traced program after internal symbols (s39...): use the documented names
    graph = onnx_program.model.graph
    for value, (_, _, shape) in zip([*graph.inputs, *graph.outputs], [*spec["inputs"], *spec["outputs"]], strict=True):
        value.shape = ir.Shape(shape)
    onnx_program.save(path)  # weights go to a side file only when the graph would pass protobuf's 2 GB
    return int(onnx_program.model.opset_imports.get("", opset))


def _describe(entries: Sequence[tuple[str, str, list[Any]]]) -> list[dict[str, Any]]:
    return [{"name": name, "dtype": dtype, "shape": shape} for name, dtype, shape in entries]


def export_graphs(
    model: WeTok,
    folder: str | Path,
    *,
    format: str = "onnx",
    opset: int = DEFAULT_OPSET,
    parts: Sequence[str] = PARTS,
) -> dict[str, Path]:
    """Write the ``parts`` of ``model`` (``encoder``, ``decoder``) in ``format`` (:data:`FORMATS`) and a
    ``metadata.json`` into the new folder ``folder`` (which must not exist or be empty; nothing is left behind on
    failure). Returns the path of each part and of ``metadata``. ``opset`` applies to ONNX."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not parts or any(p not in PARTS for p in parts):
        raise ValueError(f"parts must be a non-empty selection of {', '.join(PARTS)}, got {list(parts)}")
    if format == "onnx":
        if opset < MIN_OPSET:
            raise ValueError(f"opset must be {MIN_OPSET} or higher, got {opset}")
        require_onnx()
    weights_id = model.weights_id  # the identity of the given weights, not of their float32 copy
    plain = plain_float32_copy(model)
    specs = _specs(plain)
    folder = Path(folder)
    cfg = plain.config
    metadata: dict[str, Any] = {
        "wetok_export_version": 1,
        "format": format,
        "opset": opset if format == "onnx" else None,
        "torch_version": torch.__version__,
        "model": model.name_or_path,
        "model_id": model.model_id,
        "weights_id": weights_id,
        "downsample_factor": plain.downsample_factor,
        "groups": cfg.groups,
        "bits_per_group": cfg.bits_per_group,
        "latent_channels": cfg.groups * cfg.bits_per_group,
        "generative_decoder": cfg.generative_decoder,
        "image_range": [-1.0, 1.0],
        "min_latent_size": MIN_LATENT_SIZE,
        "config": cfg.to_dict(),
        "graphs": {},
    }

    def write(tmp: Path) -> None:
        for part in parts:
            spec = specs[part]
            name = part + _SUFFIX[format]
            program = _trace(spec)
            if format == "onnx":
                metadata["opset"] = _save_onnx(program, spec, tmp / name, opset)
            else:
                torch.export.save(program, tmp / name)
            metadata["graphs"][part] = {
                "file": name,
                "files": sorted(p.name for p in tmp.iterdir() if p.name.startswith(name)),
                "inputs": _describe(spec["inputs"]),
                "outputs": _describe(spec["outputs"]),
            }
        (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")

    atomic_folder(folder, write)
    return {**{part: folder / metadata["graphs"][part]["file"] for part in parts}, "metadata": folder / METADATA_NAME}


def export_onnx(model: WeTok, folder: str | Path, *, opset: int = DEFAULT_OPSET,
                parts: Sequence[str] = PARTS) -> dict[str, Path]:
    """:func:`export_graphs` in ONNX: ``encoder.onnx``, ``decoder.onnx``, ``metadata.json``."""
    return export_graphs(model, folder, format="onnx", opset=opset, parts=parts)


def export_program(model: WeTok, folder: str | Path, *, parts: Sequence[str] = PARTS) -> dict[str, Path]:
    """:func:`export_graphs` as torch.export programs: ``encoder.pt2``, ``decoder.pt2`` (load with
    ``torch.export.load(path).module()``), ``metadata.json``."""
    return export_graphs(model, folder, format="exported-program", parts=parts)
