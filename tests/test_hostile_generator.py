"""Hostile input to the generator side (issue 14): AR checkpoints and configs, token shards, `wetok tokenize`,
`wetok sample` and `wetok eval-gen`. Every bad input gives exit 2, one stderr line, no traceback, nothing written,
and (where a small file could ask for a lot) bounded peak memory, measured in a child process.

Each hostile file is built in the test. Checks made before any model or data is touched run in process (the
result goes through the same :func:`hostile.assert_refused`); the memory-amplification cases run in a child.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from hostile import Result, assert_refused, run_wetok
from test_token_shards import make_dataset
from wetok.cli import sample as sample_cli
from wetok.cli.main import main
from wetok.errors import CheckpointError, InputError, WetokError
from wetok.generation import BUNDLED_GENERATOR_DIR, WeTokAR, get_ar_config, list_ar_presets
from wetok.generation.checks import check_state_shapes, parameter_count, state_shapes
from wetok.generation.pretrained import load_generator
from wetok.pretokenize import MAX_CLASSES, read_file_list
from wetok.token_shards import INDEX_NAME, MAX_SAMPLES, TokenDataset, read_index, shard_name, shown


def wetok_inproc(capsys: pytest.CaptureFixture, *args: str | Path) -> Result:
    """``wetok ARGS`` in this process (for checks made before any work), as a :class:`hostile.Result`."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return Result(code, out.out, out.err, float("nan"))


def native_folder(root: Path, name: str, config: dict | str | None = None, weights: bytes | None = None) -> Path:
    """A copy of the bundled generator's folder (no tokenizer) with its config.json / weights replaced."""
    folder = root / name
    folder.mkdir()
    data = json.loads((BUNDLED_GENERATOR_DIR / "config.json").read_text())
    text = config if isinstance(config, str) else json.dumps({**data, **(config or {})})
    (folder / "config.json").write_text(text)
    if weights is None:
        shutil.copy(BUNDLED_GENERATOR_DIR / "model.safetensors", folder / "model.safetensors")
    else:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ------------------------------------------------------------------------------------------- generator weights
def test_closed_form_shapes_and_count_equal_the_built_model() -> None:
    for name in list_ar_presets():
        config = get_ar_config(name)
        with torch.device("meta"):  # the official sizes too, without memory
            model = WeTokAR(config)
        assert state_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert parameter_count(config) == model.num_parameters()


@pytest.mark.parametrize(("case", "config", "expect"), [
    ("10^7 layers", {"spatial_layers": 10**7}, "spatial_layers must be at most 256"),
    ("10^6 wide", {"dim": 1 << 20, "n_head": 1 << 10, "ffn_hidden": None}, "dim must be at most 65536"),
    ("10^5 x 10^5 grid", {"grid_height": 100000, "grid_width": 100000}, "grid_height must be at most 256"),
    ("one more layer", {"spatial_layers": 7}, "do not match the config: 7 missing"),
    ("float width", {"dim": 192.0}, "must be an integer"),
    ("nan rope", {"rope_base": float("nan")}, "rope_base must be finite"),
    ("forged name", {"name": "x\n\x1b[2Jforged"}, "name must be printable"),
])
def test_native_config_asking_for_more_than_the_file_is_refused_before_building(
        tmp_path: Path, case: str, config: dict, expect: str) -> None:
    folder = native_folder(tmp_path, "g", config)
    with pytest.raises(WetokError, match=re.escape(expect)):
        load_generator(folder)


def test_native_weights_tampered(tmp_path: Path) -> None:
    huge = safetensors_bytes({"x": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 4]}}, b"\0" * 4)
    far = safetensors_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1 << 50]}}, b"\0" * 4)
    for name, weights in (("text", b"not a safetensors file\n"), ("huge", huge), ("far", far),
                          ("length", struct.pack("<Q", 1 << 60) + b"{}")):
        with pytest.raises(InputError, match="cannot read weights"):
            load_generator(native_folder(tmp_path, name, weights=weights))
    state = load_file(BUNDLED_GENERATOR_DIR / "model.safetensors")
    key = "token_emb.0.weight"
    for name, value, expect in (("nan", state[key].clone().fill_(float("nan")), "NaN or infinite"),
                                ("int", state[key].long(), "floating-point"),
                                ("shape", state[key][:-1].clone(), "the config needs")):
        save_file({**state, key: value}, tmp_path / "w.safetensors")
        folder = native_folder(tmp_path, name, weights=(tmp_path / "w.safetensors").read_bytes())
        with pytest.raises(CheckpointError, match=re.escape(expect)):
            load_generator(folder)


def test_huge_config_in_a_child_costs_no_memory(tmp_path: Path) -> None:
    folder = native_folder(tmp_path, "g", {"spatial_layers": 10**7, "dim": 4096, "n_head": 32, "ffn_hidden": None})
    out = tmp_path / "out"
    result = run_wetok("sample", "0", "-o", out, "--model", folder, "--tokenizer", "cifar10-tokenizer", "-q",
                       cwd=tmp_path)
    assert_refused(result, contains=("config.json", "spatial_layers must be at most 256"), output=out, peak_mib=1000)


@pytest.mark.shared(FIXTURES / "tiny_ar_g4b8.ckpt", FIXTURES / "tiny_ar_g4b8.yaml")
def test_official_checkpoint_and_yaml(tmp_path: Path) -> None:
    ckpt, official_yaml = FIXTURES / "tiny_ar_g4b8.ckpt", FIXTURES / "tiny_ar_g4b8.yaml"
    data = yaml.safe_load(official_yaml.read_text())

    def variant(name: str, **params: object) -> Path:
        copy = json.loads(json.dumps(data))
        copy["model"]["init_args"]["transformer_config"]["params"].update(params)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(copy))
        return path

    cases = [
        (ckpt, variant("wide", dim=1 << 20, cond_dim=1 << 20, n_head=1 << 10), "dim must be at most 65536"),
        (ckpt, variant("grid", block_size=10**10), "grid_height must be at most 256"),
        (ckpt, variant("heads", n_head=0), "n_head"),
        (ckpt, variant("bits", factorized_bits=[]), "factorized_bits"),
        (ckpt, "ar-tiny", "do not match the config"),
    ]
    (tmp_path / "deep.yaml").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "text.ckpt").write_text("plain text\n")
    cases += [(ckpt, tmp_path / "deep.yaml", "cannot read YAML config"),
              (tmp_path / "text.ckpt", official_yaml, "not a torch checkpoint")]
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, change, expect in (("shape", torch.zeros(255, 32), "the config needs (256, 32)"),
                                 ("nan", torch.full((256, 32), float("nan")), "NaN or infinite")):
        torch.save({"state_dict": {**state, "transformer.0_emb.weight": change}}, tmp_path / f"{name}.ckpt")
        cases.append((tmp_path / f"{name}.ckpt", official_yaml, expect))
    for model, config, expect in cases:
        with pytest.raises(WetokError, match=re.escape(expect)) as info:
            load_generator(model, config)
        assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_training_checkpoint_with_wrong_weights(tmp_path: Path) -> None:
    config = get_ar_config("ar-tiny")
    model = WeTokAR(config)
    ema = {f"module.{k}": v for k, v in model.state_dict().items()}
    base = {"task": "generator", "model_config": config.to_dict(), "ema": ema, "model": model.state_dict()}
    cases = {
        "shape": ({**base, "ema": {**ema, "module.norm.weight": torch.ones(3)}}, "the config needs (64,)"),
        "layers": ({**base, "model_config": {**config.to_dict(), "spatial_layers": 10**7}}, "spatial_layers must be at most 256"),
        "config": ({**base, "model_config": [1, 2]}, "model_config is not a mapping"),
        "values": ({**base, "model_config": {**config.to_dict(), "dim": "wide"}}, "invalid generator config"),
        "ema": ({**base, "ema": {"module.x": 1}}, "not a mapping of names to tensors"),
    }
    for name, (ckpt, expect) in cases.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        with pytest.raises(WetokError, match=re.escape(expect)):
            load_generator(tmp_path / f"{name}.pt")
    check_state_shapes(config, {k: v.shape for k, v in model.state_dict().items()}, "ok")  # the good one passes


# --------------------------------------------------------------------------------------------------- sample
BAD_OPTIONS = [
    (["--per-class", "0"], "--per-class"), (["--per-class", "1000000000"], "--per-class"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "100000"], "--batch-size"),
    (["--cfg", "nan"], "--cfg"), (["--cfg", "inf"], "--cfg"), (["--cfg", "-5"], "--cfg"), (["--cfg", "1e30"], "--cfg"),
    (["--cfg", "1,x"], "--cfg"), (["--temperature", "nan"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--temperature", "inf"], "--temperature"), (["--temperature", "1e-30"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "nan"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"), (["--seed", "99999999999999999999999"], "--seed"), (["--seed", "-1"], "--seed"),
    (["--npz", "x.zip"], "must end in .npz"), (["--grid", "g.txt"], "unsupported image type"),
]


def test_sample_options_refused_before_any_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    def no_model(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sample_cli, "load_models", no_model)
    out = tmp_path / "out"
    for extra, expect in BAD_OPTIONS:
        assert_refused(wetok_inproc(capsys, "sample", "0", "-o", out, *extra), contains=expect, output=out)
    for classes, expect in ((["abc"], "not a class number"), (["-3"], "not a class number"), (["9" * 500], "..."),
                            (["5-2"], "empty class range")):
        line = assert_refused(wetok_inproc(capsys, "sample", *classes, "-o", out), contains=expect, output=out)
        assert len(line) < 200
    (tmp_path / "file").write_text("x")
    assert_refused(wetok_inproc(capsys, "sample", "0", "-o", tmp_path / "file" / "sub"),
                   contains="not a writable folder")
    monkeypatch.undo()
    line = assert_refused(wetok_inproc(capsys, "sample", "0", "-o", out, "--model", "x\n\x1b[2Jforged line"))
    assert line.isprintable()
    assert not out.exists()


def test_sample_limits_that_need_the_model(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    cases = [
        (["0", "--top-k", "17"], "at most the 16 values"),
        (["10"], "unknown class 10"),
        (["0-999999999"], "unknown class 999999999"),
        (["0-9", "--per-class", "100000", "--grid"], "pixel limit"),
        (["0-9", "0-9", "--per-class", "100000"], "over the limit of 1000000 per run"),
    ]
    for args, expect in cases:
        assert_refused(wetok_inproc(capsys, "sample", *args, "-o", out, "-q"), contains=expect, output=out)
    monkeypatch.setattr(sample_cli.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6, 1000))
    assert_refused(wetok_inproc(capsys, "sample", "0", "--per-class", "10", "--npz", out / "a.npz", "-o", out, "-q"),
                   contains="only 0.00 GB are free", output=out)
    monkeypatch.setattr(sample_cli, "MAX_CACHE_BYTES", 1 << 20)
    assert_refused(wetok_inproc(capsys, "sample", "0", "--per-class", "8", "--batch-size", "8", "--cfg", "2",
                                "-o", out, "-q"), contains="GiB of key / value cache", output=out)


def test_sample_failure_midway_leaves_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    real = sample_cli.iter_images

    def failing(*args, **kwargs):
        batches = real(*args, **kwargs)
        yield next(batches)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample_cli, "iter_images", failing)
    assert_refused(wetok_inproc(capsys, "sample", "0", "1", "--batch-size", "1", "--grid", "--npz", out / "a.npz",
                                "-o", out, "-q"), contains="no space left", output=out)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- token shards
def tamper_index(folder: Path, **changes: object) -> None:
    data = json.loads((folder / INDEX_NAME).read_text())
    data.update(changes)
    (folder / INDEX_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize(("changes", "expect"), [
    ({"groups": "4"}, "'groups' is missing or has the wrong type"),
    ({"bits_per_group": -3}, "out of range"),
    ({"grid": [3, -2]}, "two positive integers"),
    ({"num_images": -1}, "negative"),
    ({"class_names": [1, 2]}, "class_names"),
    ({"shards": [{"file": "../../etc/passwd.safetensors", "count": 1}]}, "bad shard entry"),
    ({"shards": [{"file": "/etc/x.safetensors", "count": 1}]}, "bad shard entry"),
    ({"shards": [{"file": "a\x1b[31m.safetensors", "count": 1}]}, "bad shard entry"),
    ({"shards": [{"file": "shard-00000.safetensors", "count": -5}]}, "bad shard entry"),
    ({"shards": [{"file": "shard-00000.safetensors", "count": True}]}, "bad shard entry"),
    ({"shards": [{"file": "shard-00000.safetensors", "count": MAX_SAMPLES + 1}]}, "over the limit"),
    ({"shards": [{"file": "shard-00000.safetensors", "count": 4}]}, "holds 5 samples, the index says 4"),
    ({"shards": [{"file": "missing.safetensors", "count": 5}]}, "missing"),
    ({"bad_images": [1]}, "bad_images"),
    ({"version": ["\x1b[2J"] * 10000}, "token-shard index version"),
])
def test_tampered_index(tmp_path: Path, changes: dict, expect: str) -> None:
    make_dataset(tmp_path)
    tamper_index(tmp_path, **changes)
    with pytest.raises(InputError, match=re.escape(expect)) as info:
        TokenDataset(tmp_path)
    message = str(info.value)
    assert message.isprintable() and len(message) < 400


def test_index_parser_limits(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    text = (tmp_path / INDEX_NAME).read_text()
    for bad, expect in (("[" * 200000 + "]" * 200000, "nested too deeply"),
                        (text.replace('"num_images": 8', '"num_images": ' + "9" * 5000), "invalid JSON"),
                        (b"\xff\xfe".decode("latin-1"), "invalid JSON")):
        (tmp_path / INDEX_NAME).write_text(bad)
        with pytest.raises(InputError, match=re.escape(expect)):
            read_index(tmp_path)


def test_shards_that_disagree_with_the_index(tmp_path: Path) -> None:
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    make_dataset(tmp_path, counts=(5,))
    shard = tmp_path / shard_name(0)
    good = load_np(str(shard))
    from safetensors import safe_open

    with safe_open(str(shard), "np") as f:
        metadata = f.metadata()
    cases = {
        "dtype": ({**good, "indices": good["indices"].astype(np.uint16)}, "expected uint8"),
        "shape": ({**good, "indices": good["indices"][:, :, :1]}, "tensor 'indices'"),
        "labels": ({**good, "labels": np.full(5, 7, np.int64)}, "labels outside 0..2"),
        "views": ({**good, "views": np.full(5, 9, np.uint8)}, "view ids outside"),
        "missing": ({k: v for k, v in good.items() if k != "images"}, "no tensor 'images'"),
    }
    for arrays, expect in cases.values():
        save_np(arrays, str(shard), metadata=metadata)
        with pytest.raises(InputError, match=re.escape(expect)):
            TokenDataset(tmp_path)
    save_np({**good, "indices": np.full_like(good["indices"], 200)}, str(shard), metadata=metadata)
    with pytest.raises(InputError, match="index >= 2"):
        TokenDataset(tmp_path)[0]  # indices are checked as they are read (4 bits: values < 16)
    header = json.dumps({"indices": {"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}}).encode()
    shard.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(InputError, match="bad header entry"):
        TokenDataset(tmp_path)


def test_names_from_files_are_escaped(tmp_path: Path) -> None:
    assert shown("ok\n\x1b[31mred") == "ok\\n\\x1b[31mred"
    assert len(shown("x" * 10000)) == 83
    make_dataset(tmp_path, views=("center", "evil\n\x1b[2Jview"))
    with pytest.raises(InputError) as info:
        TokenDataset(tmp_path, views=["nope\r"])
    assert str(info.value).isprintable()


# -------------------------------------------------------------------------------------------------- tokenize
def test_bad_file_lists(tmp_path: Path) -> None:
    listing = tmp_path / "l.txt"
    cases = [
        (f"a.png\t{10**9}\n", f"over the limit of {MAX_CLASSES} classes"),
        ("a.png\t" + "9" * 5000 + "\n", "not among the class names"),  # not a number: a (missing) class name
        ("a.png\t\u00b2\n", "not among the class names"),  # a superscript two is no class number
        ("a\0b.png\t1\n", "NUL"),
        ("a.png\t0\nb.png\t-1\n", "labels mix class numbers and class names (e.g. '-1')"),  # not renumbered
        ("x" * 20000 + "\t1\n", "longer than"),
        (b"\xff\xfe\t1\n".decode("latin-1"), None),
    ]
    for text, expect in cases:
        if expect is None:
            listing.write_bytes(b"\xff\xfe\t1\n")
            expect = "cannot read the file list"
        else:
            listing.write_text(text)
        with pytest.raises(InputError, match=re.escape(expect)):
            read_file_list(listing, ["a"] if "not among" in expect else None)


def test_tokenize_refusals(tmp_path: Path, capsys) -> None:
    images = tmp_path / "imgs" / "cat"
    images.mkdir(parents=True)
    (images / "broken.png").write_text("not an image")
    (tmp_path / "file").write_text("x")
    model = ["--model", "tiny-f8", "--random-init", "--num-workers", "0", "-q"]
    out = tmp_path / "out"
    for extra, expect in ((["--size", "100000"], "--size"), (["--ten-crop", "--crop-scale", "nan"], "--crop-scale"),
                          (["--num-workers", "1000000"], "--num-workers"),
                          (["--batch-size", "100000"], "--batch-size"),
                          (["--size", "256", "--shard-size", "10000000"], "--shard-size")):
        assert_refused(wetok_inproc(capsys, "tokenize", tmp_path / "imgs", "-o", out, *model, *extra),
                       contains=expect, output=out)
    assert_refused(wetok_inproc(capsys, "tokenize", tmp_path / "imgs", "-o", tmp_path / "file" / "sub", *model,
                                "--size", "32"), contains="cannot create the output folder")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(map(str, range(MAX_CLASSES + 1))))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'broken.png'}\t0\n")
    assert_refused(wetok_inproc(capsys, "tokenize", listing, "--class-names", names, "-o", out, *model),
                   contains="more than", output=out)
    # every image unreadable: one line, and neither shards nor an index are left
    result = wetok_inproc(capsys, "tokenize", listing, "-o", out, *model, "--size", "32")
    assert result.returncode == 2 and "none of the 1 images could be read" in result.stderr
    assert not out.exists()


def test_huge_label_in_a_child_costs_no_memory(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.png\t{MAX_CLASSES * 1000}\n")
    out = tmp_path / "out"
    result = run_wetok("tokenize", listing, "-o", out, "--model", "tiny-f8", "--random-init", "-q", cwd=tmp_path)
    assert_refused(result, contains="classes", output=out, peak_mib=1000)


# -------------------------------------------------------------------------------------------------- eval-gen
def npz_member(path: Path, header: dict, data: bytes, *, method: int = zipfile.ZIP_STORED, flags: int = 0) -> Path:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr("arr_0.npy", buf.getvalue() + data)
    if flags:  # set general-purpose flags (e.g. 1: encrypted) in the local and central headers
        raw = bytearray(path.read_bytes())
        central = raw.find(b"PK\x01\x02")
        raw[6:8] = raw[central + 8:central + 10] = struct.pack("<H", flags)
        path.write_bytes(bytes(raw))
    return path


def test_eval_gen_refusals(tmp_path: Path, capsys, monkeypatch) -> None:
    from wetok import generation_metrics

    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    images = {"descr": "|u1", "fortran_order": False, "shape": (2, 8, 8, 3)}
    many = tmp_path / "many.npz"
    with zipfile.ZipFile(many, "w") as z:
        for i in range(1100):
            z.writestr(f"a{i}.npy", b"")
    np.savez(tmp_path / "obj.npz", arr_0=np.array([{"a": 1}] * 4, dtype=object))
    (tmp_path / "file").write_text("x")
    cases = [
        (npz_member(tmp_path / "huge.npz", {**images, "shape": (10**9, 1000, 1000, 3)}, b"\0" * 64), [],
         "header declares"),
        (npz_member(tmp_path / "big.npz", {**images, "shape": (1, 5000, 5000, 3)}, bytes(5000 * 5000 * 3),
                    method=zipfile.ZIP_DEFLATED), [], "pixel limit"),  # a 75 MB image in a 76 KB file
        (npz_member(tmp_path / "enc.npz", images, bytes(384), flags=1), [], "encrypted"),
        (many, [], "over the limit of 1024"),
        (tmp_path / "obj.npz", [], "allow_pickle=False"),
        (good, ["--crop", "100000"], "--crop"),
        (good, ["--num-workers", "1000000"], "--num-workers"),
        (good, ["--batch-size", "100000"], "--batch-size"),
        (good, ["--out", tmp_path / "file" / "r.json"], "not a writable folder"),
    ]
    np.savez(tmp_path / "nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    np.savez_compressed(tmp_path / "wide.npz", mu=np.zeros(4100), sigma=np.zeros((4100, 4100)))  # 134 MB in 130 KB
    cases += [(good, ["--ref", tmp_path / "nan.npz", "--metrics", "fid"], "NaN or infinite"),
              (good, ["--ref", tmp_path / "wide.npz", "--metrics", "fid"], "D <= 4096")]
    for samples, extra, expect in cases:
        ref = [] if "--ref" in extra else ["--ref", good]
        assert_refused(wetok_inproc(capsys, "eval-gen", samples, *ref, *extra), contains=expect)
    monkeypatch.setattr(generation_metrics, "MAX_IMAGES", 3)
    assert_refused(wetok_inproc(capsys, "eval-gen", good, "--ref", good), contains="over the limit of 3")


def test_npz_read_errors_midway_are_one_error(tmp_path: Path, monkeypatch) -> None:
    from wetok import image_sets
    from wetok.image_sets import NpzImages

    path = tmp_path / "crc.npz"
    np.savez(path, arr_0=np.arange(4 * 64 * 64 * 3, dtype=np.uint32).astype(np.uint8).reshape(4, 64, 64, 3))
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"\x93NUMPY") + 128 + 5000] ^= 0xFF  # corrupt the data (not the header): a bad CRC at the end
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="cannot be read"):
        list(NpzImages(path).batches(50))
    # large images are read in smaller batches, whatever batch size is asked for
    big = tmp_path / "big.npz"
    np.savez(big, arr_0=np.zeros((5, 16, 16, 3), np.uint8))
    monkeypatch.setattr(image_sets, "MAX_BATCH_BYTES", 2 * 16 * 16 * 3 * 4)
    assert [len(b.index) for b in NpzImages(big).batches(50)] == [2, 2, 1]


def test_large_batches_are_decoded_in_parts(monkeypatch) -> None:
    from wetok.generation import images as gen_images
    from wetok.image import to_uint8
    from wetok.pipeline import decode_indices

    model = WeTokAR.from_pretrained("cifar10-ar")
    monkeypatch.setattr(gen_images, "MAX_DECODE_PIXELS", 2 * 32 * 32)  # two 32 x 32 images a part
    got = list(gen_images.iter_images(model, [0, 1, 2], batch_size=3, noise_seed=5, top_k=1))
    assert len(got) == 1 and tuple(got[0][1].shape) == (3, 32, 32, 3)
    indices = model.generate([0, 1, 2], top_k=1)
    parts = [decode_indices(model.tokenizer, indices[:2], None, 5), decode_indices(model.tokenizer, indices[2:], None, 7)]
    expected = to_uint8(torch.cat(parts)).permute(0, 2, 3, 1)
    assert torch.equal(got[0][1], expected)
