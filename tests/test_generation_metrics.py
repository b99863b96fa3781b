"""wetok.generation_metrics, wetok.image_sets and ``wetok eval-gen``: FID / IS / precision-recall against float64
numpy / scipy brute force, invariance to batch size, input form and process count, reference statistics, bad
inputs, and the real (locally made) Inception path through the command line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from test_evaluate import TinyFeatures
from wetok.cli.eval_gen import markdown_table
from wetok.cli.main import main
from wetok.data import to_model_range
from wetok.errors import InputError
from wetok.fid import FID_WEIGHTS_FILE
from wetok.generation_metrics import evaluate_generation, inception_score, precision_recall

LOGIT_WEIGHT = torch.randn(12, 8, generator=torch.Generator().manual_seed(3)) * 2


# --------------------------------------------------------------------------------------- independent references
def ref_fid(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = np.real(scipy.linalg.sqrtm(s1 @ s2))
    d = x.mean(0) - y.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def ref_fid_stats(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    x = x.astype(np.float64)
    s1 = np.cov(x, rowvar=False)
    d = x.mean(0) - mu
    return float(
        d @ d + np.trace(s1) + np.trace(sigma) - 2 * np.trace(np.real(scipy.linalg.sqrtm(s1 @ sigma)))
    )


def ref_is(logits: np.ndarray, split: int) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split, in float64 numpy."""
    scores = []
    for start in range(0, len(logits), split):
        z = logits[start : start + split].astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        marginal = p.mean(0)
        kl = np.sum(p * (np.log(p) - np.log(marginal)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def ref_pr(fake: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """All pairwise distances by broadcasting; radius = distance to the k-th nearest other point of the same set."""

    def dists(a, b):
        return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dists(real, real), axis=1)[:, k]
    r_fake = np.sort(dists(fake, fake), axis=1)[:, k]
    d = dists(fake, real)
    precision = np.mean((d <= r_real[None, :]).any(1))
    recall = np.mean((d <= r_fake[:, None]).any(0))
    return float(precision), float(recall)


def tiny_features(images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return TinyFeatures()(to_model_range(torch.from_numpy(images).permute(0, 3, 1, 2))).numpy()


def make_images(n: int, seed: int, size: int = 16, shift: int = 0) -> np.ndarray:
    """Smooth random colour fields (so that features vary), uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (n, 4, 4, 3))
    up = torch.nn.functional.interpolate(
        torch.from_numpy(base).permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False
    )
    noise = rng.normal(0, 20, (n, 3, size, size))
    return np.clip(up.numpy() + noise + shift, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    return folder


def run_tiny(samples, ref, **kw) -> dict:
    kw.setdefault("progress", False)
    return evaluate_generation(
        samples, ref, feature_extractor=TinyFeatures(), logit_weight=LOGIT_WEIGHT, **kw
    )


# --------------------------------------------------------------------------------------------- metric functions
@pytest.mark.parametrize("split", [5000, 7, 1])
def test_inception_score_equals_numpy_brute_force(split):
    logits = np.random.default_rng(0).normal(0, 3, (23, 10))
    mean, std = inception_score(torch.from_numpy(logits), split)
    expected = ref_is(logits, split)
    assert mean == pytest.approx(expected[0], rel=1e-12) and std == pytest.approx(expected[1], abs=1e-12)
    if split == 1:  # one sample per split: p(y) = p(y|x), KL = 0
        assert mean == pytest.approx(1.0)
    # a classifier sure of 10 different classes for 10 samples: IS = 10
    assert inception_score(torch.eye(10) * 60)[0] == pytest.approx(10.0, rel=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_equals_brute_force(k):
    rng = np.random.default_rng(1)
    real = rng.normal(size=(41, 5))
    fake = rng.normal(size=(33, 5)) * 1.3 + 0.4
    p, r = precision_recall(fake, real, k=k, batch_size=10)
    assert (p, r) == ref_pr(fake, real, k)
    assert 0 < p < 1 and 0 < r < 1
    assert precision_recall(real, real, k=k) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(fake[:3], real)


# ------------------------------------------------------------------------------------------------- end to end
def test_npz_report_equals_brute_force_on_the_same_features(tmp_path):
    samples, ref = make_images(30, 0), make_images(25, 1, shift=30)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    np.savez_compressed(tmp_path / "r.npz", arr_0=ref)
    report = run_tiny(tmp_path / "s.npz", tmp_path / "r.npz", batch_size=7, is_split_size=12)
    fs, fr = tiny_features(samples), tiny_features(ref)
    m = report["metrics"]
    assert m["n_samples"] == 30 and m["n_ref_images"] == 25
    assert m["fid"] == pytest.approx(ref_fid(fs, fr), rel=1e-6) and m["fid"] > 1e-3
    logits = fs.astype(np.float64) @ LOGIT_WEIGHT.double().numpy().T
    assert (m["inception_score"], m["inception_score_std"]) == pytest.approx(ref_is(logits, 12), rel=1e-6)
    assert m["inception_score_splits"] == 3 and m["inception_score"] > 1.01
    assert (m["precision"], m["recall"]) == ref_pr(fs, fr)
    assert report["data"]["samples"]["image_size"] == [16, 16] and report["settings"]["notes"] == []


def test_batch_size_and_input_form_do_not_change_the_numbers(tmp_path):
    samples, ref = make_images(17, 2), make_images(11, 3, shift=-20)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    np.savez(tmp_path / "r.npz", arr_0=ref)
    folder = write_folder(tmp_path / "s", samples)  # PNG is lossless: the same pixels
    reports = [
        run_tiny(tmp_path / "s.npz", tmp_path / "r.npz", batch_size=1, is_split_size=5)["metrics"],
        run_tiny(tmp_path / "s.npz", tmp_path / "r.npz", batch_size=7, is_split_size=5)["metrics"],
        run_tiny(folder, tmp_path / "r.npz", batch_size=4, is_split_size=5)["metrics"],
    ]
    for other in reports[1:]:
        assert other["precision"] == reports[0]["precision"] and other["recall"] == reports[0]["recall"]
        for key in ("fid", "inception_score", "inception_score_std"):
            assert other[key] == pytest.approx(reports[0][key], rel=1e-6), key


def test_folder_of_mixed_sizes_and_crop(tmp_path):
    images = make_images(6, 4, size=24)
    folder = write_folder(tmp_path / "mixed", images)
    Image.fromarray(make_images(1, 5, size=32)[0][:, :20]).save(folder / "zz_wide.png")  # 32 x 20
    ref = make_images(6, 6)
    np.savez(tmp_path / "r.npz", arr_0=ref)
    report = run_tiny(folder, tmp_path / "r.npz", batch_size=4, metrics="fid")
    feats = np.concatenate(
        [tiny_features(images), tiny_features(np.array(Image.open(folder / "zz_wide.png"))[None])]
    )
    assert report["metrics"]["fid"] == pytest.approx(ref_fid(feats, tiny_features(ref)), rel=1e-6)
    cropped = run_tiny(folder, tmp_path / "r.npz", batch_size=4, metrics="fid", crop=16)
    assert cropped["data"]["samples"]["image_size"] == [16, 16]
    assert cropped["metrics"]["fid"] != pytest.approx(report["metrics"]["fid"], rel=1e-3)


def _worker(rank: int, world: int, init_file: str, out_dir: str, samples: str, ref: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        report = run_tiny(samples, ref, batch_size=3, is_split_size=6)
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    samples = write_folder(tmp_path / "s", make_images(13, 7))
    np.savez(tmp_path / "r.npz", arr_0=make_images(10, 8, shift=20))
    single = run_tiny(samples, tmp_path / "r.npz", batch_size=5, is_split_size=6)
    mp.spawn(
        _worker,
        args=(2, tempfile.mktemp(dir=tmp_path), str(tmp_path), str(samples), str(tmp_path / "r.npz")),
        nprocs=2,
        join=True,
    )
    for rank in range(2):
        report = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert report["settings"]["world_size"] == 2
        m, s = report["metrics"], single["metrics"]
        assert (m["n_samples"], m["n_ref_images"], m["precision"], m["recall"]) == (
            s["n_samples"],
            s["n_ref_images"],
            s["precision"],
            s["recall"],
        )
        for key in ("fid", "inception_score", "inception_score_std"):
            assert m[key] == pytest.approx(s[key], rel=1e-6), key


# ------------------------------------------------------------------------------------------ reference statistics
def test_statistics_references(tmp_path):
    samples, ref = make_images(20, 9), make_images(18, 10, shift=25)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    fr = tiny_features(ref).astype(np.float64)
    mu, sigma = fr.mean(0), np.cov(fr, rowvar=False)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)  # pytorch-fid's --save-stats layout
    only = run_tiny(tmp_path / "s.npz", tmp_path / "stats.npz")
    m = only["metrics"]
    assert m["fid"] == pytest.approx(ref_fid(tiny_features(samples), fr), rel=1e-6)
    assert "precision" not in m and m["n_ref_images"] is None and m["inception_score"] > 1
    assert "precision / recall skipped" in only["settings"]["notes"][0]
    assert only["settings"]["fid_reference"] == "stored mu / sigma"
    assert only["settings"]["metrics"] == ["fid", "is"]
    table = markdown_table(only)
    assert f"| FID | {m['fid']:.4f} |" in table and "stored" not in table and "| note | precision" in table
    # ADM layout: images plus stored statistics (here deliberately other ones) -> both FIDs
    other_mu, other_sigma = mu + 0.5, sigma * 1.5
    np.savez(
        tmp_path / "adm.npz", arr_0=ref, mu=other_mu, sigma=other_sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3]
    )
    both = run_tiny(tmp_path / "s.npz", tmp_path / "adm.npz")["metrics"]
    assert both["fid"] == pytest.approx(m["fid"], rel=1e-6)
    assert both["fid_stored_stats"] == pytest.approx(
        ref_fid_stats(tiny_features(samples), other_mu, other_sigma), rel=1e-6
    )
    assert (both["precision"], both["recall"]) == ref_pr(tiny_features(samples), tiny_features(ref))
    np.savez(tmp_path / "wrongdim.npz", mu=mu[:4], sigma=sigma[:4, :4])
    with pytest.raises(InputError, match="wrongdim.npz: mu is 4-d; the features are 8-d"):
        run_tiny(tmp_path / "s.npz", tmp_path / "wrongdim.npz")


# -------------------------------------------------------------------------------------------------- bad inputs
def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=make_images(5, 11))
    np.savez(tmp_path / "float.npz", arr_0=make_images(5, 11).astype(np.float32))
    np.savez(tmp_path / "rank3.npz", arr_0=make_images(5, 11)[..., 0])
    np.savez(tmp_path / "pickled.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    np.savez(tmp_path / "noarr.npz", images=make_images(5, 11))
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    (tmp_path / "notzip.npz").write_bytes(b"\x80\x04 a pickle, not a zip")
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "emptydir").mkdir()
    header = io.BytesIO()  # an .npy whose header declares 9 images but which holds 5
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (9, 16, 16, 3)}
    )
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive:
        archive.writestr("arr_0.npy", header.getvalue() + make_images(5, 11).tobytes())
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    s = str(good)
    return [
        (
            [str(tmp_path / "float.npz"), "--ref", s],
            "float.npz: 'arr_0' is float32 (5, 16, 16, 3); expected uint8",
        ),
        (
            [str(tmp_path / "rank3.npz"), "--ref", s],
            "rank3.npz: 'arr_0' is uint8 (5, 16, 16); expected uint8",
        ),
        ([s, "--ref", str(tmp_path / "pickled.npz")], "pickled.npz: 'arr_0' holds pickled Python objects"),
        ([str(tmp_path / "noarr.npz"), "--ref", s], "noarr.npz: has no 'arr_0' images (arrays: images)"),
        ([s, "--ref", str(tmp_path / "noarr.npz")], "noarr.npz: has neither 'arr_0' images nor 'mu'"),
        ([str(tmp_path / "empty.npz"), "--ref", s], "empty.npz: 'arr_0' holds no image"),
        ([str(tmp_path / "notzip.npz"), "--ref", s], "notzip.npz: not an .npz file"),
        ([str(tmp_path / "truncated.npz"), "--ref", s], "truncated.npz: not an .npz file"),
        (
            [str(tmp_path / "short.npz"), "--ref", s],
            "short.npz: 'arr_0' is truncated or corrupt: its header declares",
        ),
        ([str(tmp_path / "emptydir"), "--ref", s], "emptydir: no image files under this folder"),
        ([str(tmp_path / "missing"), "--ref", s], "missing: does not exist"),
        ([s, "--ref", s, "--metrics", "fid,bogus"], "unknown metric 'bogus'"),
        ([s, "--ref", str(tmp_path / "stats.npz"), "--metrics", "pr"], "stats.npz: holds statistics only"),
        ([s, "--ref", s, "--k", "5"], "good.npz: has 5 images; precision / recall with k = 5 needs > 5"),
    ]


def test_bad_inputs_are_one_line_exit_2_and_no_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights anywhere: inputs fail first
    monkeypatch.setenv("WETOK_OFFLINE", "1")
    monkeypatch.delenv("WETOK_INCEPTION_WEIGHTS", raising=False)
    out = tmp_path / "report.json"
    for argv, message in _bad_inputs(tmp_path):
        code = main(["eval-gen", *argv, "--out", str(out), "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
        assert not out.exists()
    good = str(tmp_path / "good.npz")
    code = main(["eval-gen", good, "--ref", good, "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and FID_WEIGHTS_FILE in err[0] and "--inception-weights" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".report.json*"))


def test_a_corrupt_image_in_a_folder_names_the_file(tmp_path):
    folder = write_folder(tmp_path / "s", make_images(5, 12))
    (folder / "0002.png").write_bytes(b"\x89PNG junk")
    np.savez(tmp_path / "r.npz", arr_0=make_images(5, 13))
    with pytest.raises(InputError, match="0002.png: cannot decode image"):
        run_tiny(folder, tmp_path / "r.npz")


# ------------------------------------------------------------------------------ the real network, command line
def _local_inception_weights(path: Path) -> dict[str, torch.Tensor]:
    """A randomly initialised FID Inception with batch-norm statistics set on random images (so that features
    are informative), saved in the pytorch-fid weight layout. No download."""
    from pytorch_fid import inception as pfi

    torch.manual_seed(0)
    with mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, **k: None):
        with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}):
            net = pfi.fid_inception_v3()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    state = net.eval().state_dict()
    torch.save(state, path)
    return state


@pytest.mark.filterwarnings(
    "ignore:Matrix is singular"
)  # 9 samples, 2048-d features: rank-deficient covariances
def test_cli_with_local_inception_weights_equals_pytorch_fid_brute_force(tmp_path):
    from pytorch_fid import inception as pfi

    weights = tmp_path / FID_WEIGHTS_FILE
    state = _local_inception_weights(weights)
    samples, ref = make_images(9, 14, size=24), make_images(8, 15, size=24, shift=40)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    ref_dir = write_folder(tmp_path / "ref", ref)
    out = tmp_path / "report.json"
    env = {
        **os.environ,
        "WETOK_OFFLINE": "1",
        "WETOK_INCEPTION_WEIGHTS": str(weights),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "wetok.cli.main", "eval-gen", str(tmp_path / "s.npz"), "--ref", str(ref_dir)]
    cmd += ["--out", str(out), "--batch-size", "4", "--is-split-size", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())

    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        net = pfi.InceptionV3([3]).eval()
    with torch.no_grad():
        fs, fr = (
            net(torch.from_numpy(x).permute(0, 3, 1, 2).double().div(255).float())[0].flatten(1).numpy()
            for x in (samples, ref)
        )
    m = report["metrics"]
    assert m["fid"] == pytest.approx(ref_fid(fs, fr), rel=1e-4) and m["fid"] > 1
    logits = fs.astype(np.float64) @ state["fc.weight"].double().numpy().T  # no bias, as ADM
    assert (
        m["inception_score"] == pytest.approx(ref_is(logits, 5)[0], rel=1e-4) and m["inception_score"] > 1.01
    )
    assert m["inception_score_splits"] == 2
    assert (m["precision"], m["recall"]) == ref_pr(fs, fr)
    assert str(weights) in report["settings"]["features"] and report["versions"]["torch-fidelity"]
    assert "| FID |" in done.stdout and f"{m['fid']:.4f}" in done.stdout
