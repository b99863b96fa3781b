"""wetok.evaluate and ``wetok eval``: protocols against per-image brute force, invariance to batch size and process
count, the generative decoder's seed, reference statistics, bad files, the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from conftest import PHOTOS
from wetok import WeTok, WeTokConfig
from wetok.cli.main import main
from wetok.data import eval_transform, find_images, load_rgb, to_tensor_transform
from wetok.errors import InputError
from wetok.evaluate import evaluate


class TinyFeatures(nn.Module):
    """Locally made stand-in for the Inception network: [-1, 1] images -> 8-d features."""

    feature_dim = 8

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(8, 3, 4, 4, generator=g) * 0.3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.conv2d(images.float(), self.weight, stride=4)).mean((2, 3))


def tiny_model(ch_mult=(1, 2, 2), generative: bool = False) -> WeTok:
    torch.manual_seed(0)
    cfg = WeTokConfig(
        channels=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=8, groups=2, bits_per_group=4, norm_groups=4
    )
    model = WeTok(cfg)
    return (model.to_generative() if generative else model).eval()


def _u8(x: torch.Tensor) -> np.ndarray:
    return ((x.double().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------------- protocols
def test_crop256_equals_per_image_brute_force():
    model = tiny_model()
    report = evaluate(model, PHOTOS, metrics="psnr,ssim,usage", limit=2, batch_size=2, progress=False)
    psnr, ssim, hist = [], [], np.zeros((2, 16), int)
    for path in find_images(PHOTOS)[:2]:
        x = eval_transform(256)(load_rgb(path))[None]
        with torch.no_grad():
            rec = model.reconstruct(x)[0].clamp(-1, 1)
            idx = model.encode(x).indices[0].reshape(-1, 2).numpy()
        psnr.append(peak_signal_noise_ratio(_u8(x[0]), _u8(rec), data_range=255))
        ssim.append(structural_similarity(_u8(x[0]), _u8(rec), data_range=255, channel_axis=-1))
        for g in range(2):
            hist[g] += np.bincount(idx[:, g], minlength=16)
    m = report["metrics"]
    assert m["n_images"] == 2 and report["data"]["n_files"] == 2
    assert m["psnr"] == pytest.approx(np.mean(psnr), rel=1e-6)
    assert m["ssim"] == pytest.approx(np.mean(ssim), rel=1e-5)
    assert m["usage"]["pooled"]["used_codes"] == int((hist.sum(0) > 0).sum())
    assert [g["used_codes"] for g in m["usage"]["per_group"]] == [int((h > 0).sum()) for h in hist]
    # f = 4, 2 groups x 4 bits per position: 8 / 16 bits per pixel
    assert m["bits_per_pixel"] == 0.5 and m["compression_ratio"] == 48.0
    s = report["settings"]
    assert s["protocol"] == "crop256" and s["uint8_conversion"] == "round" and s["seed"] == 0
    assert report["versions"]["lpips"] and report["model"]["config"]["groups"] == 2


@pytest.mark.parametrize("pad_mode", ["replicate", "constant"])
def test_original_pads_to_the_models_f_and_crops_back(pad_mode):
    model = tiny_model(ch_mult=(1, 1, 1, 1, 1, 2))  # f = 32: the official script would pad to 16
    path = find_images(PHOTOS)[0]
    report = evaluate(
        model, [path], protocol="original", metrics="psnr,usage", pad_mode=pad_mode, progress=False
    )
    x = to_tensor_transform()(load_rgb(path))[None]
    h, w = x.shape[-2:]
    ph, pw = (-h) % 32, (-w) % 32
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    padded = F.pad(x, pad, mode="replicate") if pad_mode == "replicate" else F.pad(x, pad, value=0.0)
    with torch.no_grad():
        rec = model.reconstruct(padded)[0, :, pad[2] : pad[2] + h, pad[0] : pad[0] + w]
    assert report["metrics"]["psnr"] == pytest.approx(
        peak_signal_noise_ratio(_u8(x[0]), _u8(rec), data_range=255)
    )
    tokens_bits = math.ceil(h / 32) * math.ceil(w / 32) * 2 * 4
    assert report["metrics"]["bits_per_pixel"] == pytest.approx(tokens_bits / (h * w))
    assert report["settings"]["pad_mode"] == pad_mode and report["settings"]["batch_size"] == 1


# --------------------------------------------------------------------------------------------- invariance
def test_batch_size_invariance_end_to_end():
    model = tiny_model()
    reports = [
        evaluate(
            model,
            PHOTOS,
            metrics="psnr,ssim,fid,usage",
            limit=4,
            batch_size=b,
            progress=False,
            fid_feature_extractor=TinyFeatures(),
        )["metrics"]
        for b in (1, 3)
    ]
    for other in reports[1:]:
        assert other["usage"] == reports[0]["usage"]
        for key in ("psnr", "ssim", "rfid"):
            # float32 convolutions may differ in the last bits with the batch make-up; sums are exact
            assert other[key] == pytest.approx(reports[0][key], rel=1e-5), key


def test_generative_decoder_is_seeded_per_image():
    model = tiny_model(generative=True)
    with torch.no_grad():  # a non-zero noise path, so the seed matters
        model.decoder.conv_in.weight[:, model.config.z_channels :].normal_(0, 0.5)

    def run(seed: int, batch: int) -> dict:
        return evaluate(model, PHOTOS, metrics="psnr,ssim", limit=2, batch_size=batch, seed=seed, progress=False)

    a, b, c = run(0, 1), run(0, 2), run(1, 2)
    assert a["metrics"]["psnr"] == pytest.approx(b["metrics"]["psnr"], rel=1e-6)
    assert a["metrics"]["psnr"] != pytest.approx(c["metrics"]["psnr"], rel=1e-6)
    assert a["settings"]["generative_decoder"] and "SeedSequence" in a["settings"]["noise"]


def _worker(rank: int, world: int, init_file: str, out_dir: str, paths: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        report = evaluate(
            tiny_model(),
            paths,
            metrics="psnr,ssim,fid,usage",
            batch_size=2,
            progress=False,
            fid_feature_extractor=TinyFeatures(),
        )
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    paths = [str(p) for p in find_images(PHOTOS)[:3]] + [str(bad)]
    single = evaluate(
        tiny_model(),
        paths,
        metrics="psnr,ssim,fid,usage",
        batch_size=3,
        progress=False,
        fid_feature_extractor=TinyFeatures(),
    )
    assert single["data"]["n_bad"] == 1 and single["data"]["bad_files"][0]["path"] == str(bad)
    assert single["metrics"]["n_images"] == 3
    mp.spawn(_worker, args=(2, tempfile.mktemp(dir=tmp_path), str(tmp_path), paths), nprocs=2, join=True)
    for rank in range(2):
        report = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert report["settings"]["world_size"] == 2
        assert report["data"]["bad_files"] == single["data"]["bad_files"]
        assert report["metrics"]["usage"] == single["metrics"]["usage"]
        assert report["metrics"]["n_images"] == 3
        for key in ("psnr", "ssim", "rfid"):
            assert report["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), key


# ------------------------------------------------------------------------------------------ reference stats
def test_saved_stats_of_the_same_originals_give_fid_ref_equal_rfid(tmp_path):
    model = tiny_model()
    kw = dict(metrics="fid", limit=3, batch_size=3, progress=False, fid_feature_extractor=TinyFeatures())
    first = evaluate(model, PHOTOS, save_stats=tmp_path / "ref.npz", **kw)
    with np.load(tmp_path / "ref.npz") as data:
        assert int(data["n"]) == 3 and data["sigma"].shape == (8, 8)
    second = evaluate(model, PHOTOS, ref_stats=tmp_path / "ref.npz", **kw)
    assert second["metrics"]["fid_ref"] == pytest.approx(first["metrics"]["rfid"], rel=1e-8)
    with pytest.raises(InputError, match="missing.npz"):
        evaluate(model, PHOTOS, ref_stats=tmp_path / "missing.npz", **kw)


# ------------------------------------------------------------------------------------------- command line
def test_cli_eval_runs_in_a_subprocess(tmp_path):
    out = tmp_path / "r.json"
    n = min(8, len(find_images(PHOTOS)))  # 8 of the shared photographs, or the 4 examples
    cmd = [
        sys.executable,
        "-m",
        "wetok.cli.main",
        "eval",
        str(PHOTOS),
        "--model",
        "tiny-f8",
        "--random-init",
        "--metrics",
        "psnr,ssim,usage",
        "--limit",
        str(n),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["metrics"]["n_images"] == n and report["model"]["spec"] == "tiny-f8"
    assert 0 < report["metrics"]["psnr"] < 60 and report["metrics"]["compression_ratio"] == 96.0
    assert "| PSNR (dB) |" in done.stdout and f"{report['metrics']['psnr']:.4f}" in done.stdout


def test_cli_errors_are_one_line_and_leave_no_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "nope"), "--model", "tiny-f8", "--random-init", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: tiny-f8 is ")]
    assert len(err) == 1 and "nope: does not exist" in err[0]  # one error line (after the random-weights note)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("WETOK_OFFLINE", "1")
    monkeypatch.delenv("WETOK_INCEPTION_WEIGHTS", raising=False)
    code = main(["eval", str(PHOTOS), "--model", "tiny-f8", "--random-init", "--metrics", "fid", "--limit", "2",
                 "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pt_inception-2015-12-05-6726825d.pth" in err[0]
    assert "--inception-weights" in err[0]
    assert main(["eval", str(PHOTOS), "--model", "tiny-f8", "--random-init", "--metrics", "psnr,bogus",
                 "--out", str(out)]) == 2
    assert "unknown metric 'bogus'" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".r.json*"))


def test_nothing_decodable_is_an_input_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG junk")
    with pytest.raises(InputError, match="none of the 1 images could be decoded .*bad.png"):
        evaluate(tiny_model(), [bad], metrics="psnr", progress=False)


def test_cli_report_is_strict_json(tmp_path):
    from wetok.cli.eval import write_json_atomic

    out = tmp_path / "r.json"
    write_json_atomic({"metrics": {"rfid": float("nan"), "psnr": float("inf"), "x": [1.5, float("-inf")]}}, out)
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "metrics": {"rfid": None, "psnr": None, "x": [1.5, None]}
    }
