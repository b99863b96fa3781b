"""onnxruntime (CPU) running the exported graphs against wetok's PyTorch fast path, in the same process.

The model (default: the bundled ``default``) is exported with :func:`wetok.onnx_export.export_onnx` into a
temporary folder; onnxruntime runs ``encoder.onnx`` (images -> indices, latent) and ``decoder.onnx`` (indices ->
images) with ``--threads`` intra-op threads (one inter-op thread, all graph optimisations, no spinning of idle workers,
which would take the cores from PyTorch's threads between the interleaved runs). The baseline is
``wetok.fast.optimize(model, dtype="float32")`` under ``wetok.fast.inference()`` with ``torch.set_num_threads``
at the same count: ``model.encode(images)`` and ``model.decode(indices)``. Inputs: ``--batch`` real photos
(centre crop, bicubic resize to each of ``--sizes``).

Every run is warmed up once, then the four (PyTorch / onnxruntime x encode / decode) are timed ``--reps`` times,
interleaved (ABCD...), and the table gives median wall times and ``x``, PyTorch's median over onnxruntime's (above
1: onnxruntime is faster), from wall time and from process CPU time (steadier on a shared machine). Accuracy against the fast path: the share of equal token indices and the max |difference|
of decoding the same indices.

Run: python benchmarks/bench_onnx.py --sizes 256,512 --batch 1 --threads 1 --reps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_IMAGES, interleaved, load_images, machine  # noqa: E402

from wetok import WeTok  # noqa: E402
from wetok._cpu import cpu_description  # noqa: E402
from wetok.fast import inference, optimize  # noqa: E402
from wetok.onnx_export import export_onnx  # noqa: E402


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's idle workers spin by default, which starves PyTorch's threads in the interleaved runs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="registered name or model folder (default: default)")
    parser.add_argument("--sizes", default="256,512", help="comma-separated square image sizes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="folder of photos (default: shared BSDS val)")
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    print(machine())
    print(f"CPU: {cpu_description()}")
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op thread(s); batch {args.batch}; model {args.model}")

    model = WeTok.from_pretrained(args.model).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_onnx(model, Path(tmp) / "onnx")
        encoder, decoder = session(paths["encoder"], args.threads), session(paths["decoder"], args.threads)
    fast = optimize(model, device="cpu", dtype="float32")

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows += measure(fast, encoder, decoder, load_images(args.images, args.batch, size), args.reps)
    print(f"\nload average (1, 5, 15 min) at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| size | stage | threads | batch | PyTorch fast (s) | onnxruntime (s) | x wall | x CPU time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, stage, wall, cpu in rows:
        print(f"| {size} | {stage} | {args.threads} | {args.batch} | {wall[0]:.4f} | {wall[1]:.4f} | "
              f"**{wall[0] / wall[1]:.2f}** | {cpu[0] / cpu[1]:.2f} |")


def measure(fast: WeTok, encoder, decoder, images: torch.Tensor, reps: int) -> list[tuple]:
    """Accuracy and interleaved timings at one size: rows (size, stage, (torch, ort) wall, (torch, ort) CPU)."""
    size = images.shape[-1]
    with inference():
        tokens = fast.encode(images)
        reference = fast.decode(tokens.indices)
    pixels, indices = images.numpy(), tokens.indices.numpy()
    ort_indices, _ = encoder.run(None, {"images": pixels})
    (ort_images,) = decoder.run(None, {"indices": indices})
    agree = float((torch.from_numpy(ort_indices) == tokens.indices).float().mean())
    diff = float((torch.from_numpy(ort_images) - reference).abs().max())

    def torch_encode() -> None:
        with inference():
            fast.encode(images)

    def torch_decode() -> None:
        with inference():
            fast.decode(tokens.indices)

    runs = {
        "torch encode": torch_encode,
        "ort encode": lambda: encoder.run(None, {"images": pixels}),
        "torch decode": torch_decode,
        "ort decode": lambda: decoder.run(None, {"indices": indices}),
    }
    print(f"\n{size}x{size}: tokens equal {agree:.2%}, decode max|diff| {diff:.1e}")
    wall, cpu = interleaved(runs, reps, log=False)
    rows = []
    for stage in ("encode", "decode"):
        pair = (f"torch {stage}", f"ort {stage}")
        rows.append((size, stage, tuple(statistics.median(wall[n]) for n in pair),
                     tuple(statistics.median(cpu[n]) for n in pair)))
        print(f"  {stage}: PyTorch {rows[-1][2][0]:.4f} s, onnxruntime {rows[-1][2][1]:.4f} s (median wall)")
    return rows

if __name__ == "__main__":
    main()
