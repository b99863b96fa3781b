"""Hostile model folders, checkpoints and training recipes (issue 14, items 9, 10 and 14): each is refused in one
line (exit 2 from the command line), before anything large is allocated, and leaves nothing behind.

Config variants are checked in-process (many, fast); a representative few go through ``wetok`` in a subprocess
whose peak memory is measured (tests/hostile.py).
"""

from __future__ import annotations

import argparse
import json
import random
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hostile import Result, run_wetok
from hostile import assert_refused as _assert_refused
from train_helpers import TINY_RECIPE, make_images, write_recipe
from wetok import CheckpointError, InputError, WeTok, WeTokConfig
from wetok.generation.config import AR_PRESETS, WeTokARConfig
from wetok.presets import PRESETS, get_config

#: Peak memory any refused model folder / checkpoint / recipe may cost (Python + torch + a tiny model).
PEAK_MIB = 1500
TINY = get_config("tiny-f8")


def assert_refused(result: Result, **kwargs) -> str:
    """tests/hostile.py's check, with the peak memory required to have been measured."""
    assert result.peak_mib == result.peak_mib, "the child's peak memory was not measured"
    return _assert_refused(result, **kwargs)


def _meta_count(module_type, config) -> int:
    """Parameters of the model actually built (on the meta device: no memory), counted tensor by tensor."""
    with torch.device("meta"):
        return sum(p.numel() for p in module_type(config).parameters())


def _folder(path: Path, config: object, state: dict | None = None) -> Path:
    """A native model folder: ``config`` (anything JSON can hold) and ``state`` (default: tiny-f8's weights)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if state is None:
        torch.manual_seed(0)
        state = WeTok(TINY).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


# ------------------------------------------------------------------------------------------ WeTokConfig fields
BAD_TOKENIZER_FIELDS = [
    {"norm_groups": 0}, {"norm_groups": -4}, {"norm_groups": 3}, {"channels": -32}, {"channels": "32"},
    {"channels": 1e9}, {"channels": True}, {"channels": 1_000_000_000}, {"num_res_blocks": 10_000_000},
    {"num_res_blocks": 0}, {"ch_mult": "1122"}, {"ch_mult": []}, {"ch_mult": [1, 0]}, {"ch_mult": [1, 2.5]},
    {"ch_mult": [1] * 40}, {"ch_mult": None}, {"generative_decoder": 1}, {"temperature": "hot"},
    {"temperature": float("nan")}, {"temperature": 0}, {"entropy_weight": -1.0}, {"codebook_form": "nested"},
    {"token_reduction": None}, {"name": 5}, {"name": "x\n\x1b[31mforged line"}, {"groups": 0, "z_channels": 0}, {"bits_per_group": 63, "groups": 1,
    "z_channels": 63}, {"z_channels": 17}, {"codebook_form": "joint"}, {"channels": 65536},
]


@pytest.mark.parametrize("change", BAD_TOKENIZER_FIELDS, ids=lambda c: ",".join(f"{k}={v!r:.12}" for k, v in c.items()))
def test_bad_tokenizer_config_is_refused_before_building(change, tmp_path):
    base = {**TINY.to_dict(), "name": None}
    if change.get("codebook_form") == "joint":  # joint entropy over 2^z codes: refused above z = 24
        change = {**change, "groups": 8, "bits_per_group": 4, "z_channels": 32}
    with pytest.raises((TypeError, ValueError)):
        WeTokConfig(**{**base, **change})
    # the same config.json in a folder: one InputError naming the file, before the weights are looked at
    folder = _folder(tmp_path / "m", {**base, **change})
    with pytest.raises(InputError, match="config.json: invalid config") as caught:
        WeTok.from_pretrained(folder)
    assert "\n" not in str(caught.value)


def test_parameter_count_is_the_built_models_and_the_bound_can_be_raised(monkeypatch):
    configs = [cfg.replace(generative_decoder=g) for cfg in PRESETS.values() for g in (False, True)]
    rng = random.Random(0)
    for _ in range(20):  # random small architectures
        norm = rng.choice([1, 2, 4])
        groups, bits = rng.randint(1, 4), rng.randint(1, 6)
        configs.append(WeTokConfig(channels=norm * rng.randint(1, 6), ch_mult=tuple(rng.randint(1, 3) for _ in
                                   range(rng.randint(1, 4))), num_res_blocks=rng.randint(1, 3),
                                   z_channels=groups * bits, groups=groups, bits_per_group=bits, norm_groups=norm,
                                   generative_decoder=rng.random() < 0.5))
    for cfg in configs:
        assert cfg.num_parameters() == _meta_count(WeTok, cfg), cfg
    official = get_config("GeneralDomain_compratio768")  # 1.67e9 parameters: under the default bound of 2e9
    with pytest.raises(ValueError, match="2.6.e\\+09 parameters.*WETOK_MAX_PARAMETERS"):
        official.replace(channels=320)
    for value in ("1e6", "many"):  # the bound is never lowered (every preset is built at import)
        monkeypatch.setenv("WETOK_MAX_PARAMETERS", value)
        assert official.replace(name="again").num_parameters() == official.num_parameters()
    monkeypatch.setenv("WETOK_MAX_PARAMETERS", "3e9")
    assert official.replace(channels=320).num_parameters() > 2e9  # allowed once the bound is raised


# ---------------------------------------------------------------------------------------- WeTokARConfig fields
BAD_GENERATOR_FIELDS = [
    {"dim": 0}, {"dim": "64"}, {"dim": 64.0}, {"n_head": 3}, {"n_head": True}, {"spatial_layers": -1},
    {"spatial_layers": 10**7}, {"grid_height": 10**6}, {"num_classes": 10**9}, {"bits_per_group": 21},
    {"token_dropout": 1.0}, {"class_dropout": "0.1"}, {"rope_base": 0}, {"norm_eps": float("inf")},
    {"ffn_hidden": 0}, {"name": ["x"]}, {"dim": 65536, "n_head": 16}, {"groups": 100},
]


@pytest.mark.parametrize("change", BAD_GENERATOR_FIELDS, ids=lambda c: ",".join(f"{k}={v!r:.12}" for k, v in c.items()))
def test_bad_generator_config_is_refused_before_building(change):
    with pytest.raises((TypeError, ValueError)):
        AR_PRESETS["ar-tiny"].replace(**change, **({"ffn_hidden": None} if "dim" in change else {}))


def test_generator_parameter_count_is_the_built_models():
    from wetok.generation.model import WeTokAR

    for cfg in [*AR_PRESETS.values(), AR_PRESETS["ar-tiny"].replace(num_classes=3, groups=2, bits_per_group=3,
                                                                     dim=48, n_head=3, ffn_hidden=40)]:
        assert cfg.num_parameters() == _meta_count(WeTokAR, cfg), cfg.name
    with pytest.raises(TypeError, match="mapping"):
        WeTokARConfig.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        WeTokConfig.from_dict(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ weight files
def test_wrong_shapes_are_one_line_with_a_count(tmp_path):
    wide = TINY.replace(channels=64)
    torch.manual_seed(0)
    folder = _folder(tmp_path / "wide", {**TINY.to_dict()}, WeTok(wide).state_dict())
    with torch.device("meta"):
        want, got = WeTok(TINY).state_dict(), WeTok(wide).state_dict()
    differ = [k for k in want if want[k].shape != got[k].shape]
    with pytest.raises(CheckpointError) as caught:
        WeTok.from_pretrained(folder)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400
    assert f"{len(differ)} tensors have the wrong shape" in message
    assert f"first: {differ[0]} expected {list(want[differ[0]].shape)} got {list(got[differ[0]].shape)}" in message
    # missing and unexpected names: counted, first ones named
    state = WeTok(TINY).state_dict()
    state.pop("decoder.conv_out.bias")
    state["decoder.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing \(decoder.conv_out.bias\); 1 unexpected \(decoder.extra\)"):
        WeTok.from_pretrained(_folder(tmp_path / "names", TINY.to_dict(), state))
    (tmp_path / "names" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InputError, match="model.safetensors: cannot read weights"):
        WeTok.from_pretrained(tmp_path / "names")


def test_refused_checkpoints_give_one_line_and_no_weights_only_advice(tmp_path):
    from wetok.official import load_official
    from wetok.train.checkpoints import load_training_checkpoint

    (tmp_path / "text.ckpt").write_text("hello, I am a checkpoint\n" * 10)
    torch.save({"state_dict": {"a": argparse.Namespace(x=1)}}, tmp_path / "object.ckpt")  # refused by weights_only
    torch.save({"state_dict": {}}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    torch.save([1, 2], tmp_path / "list.ckpt")
    with zipfile.ZipFile(tmp_path / "deflated.ckpt", "w", zipfile.ZIP_DEFLATED) as bomb:  # inflates to 64 MiB
        bomb.writestr("archive/data.pkl", b"\x00" * 2**26)
    assert (tmp_path / "deflated.ckpt").stat().st_size < 2**20
    for name in ("text", "object", "legacy", "list", "deflated"):
        for load in (lambda p: load_official(p, "tiny-f8"), load_training_checkpoint):
            with pytest.raises(InputError) as caught:
                load(tmp_path / f"{name}.ckpt")
            message = str(caught.value)
            assert f"{name}.ckpt" in message and "\n" not in message and "weights_only" not in message, message


def test_checkpoints_last_pointer_names_a_step_file_beside_it(tmp_path):
    from wetok.train.checkpoints import resolve_checkpoint

    (tmp_path / "checkpoints").mkdir()
    torch.save({"x": 1}, tmp_path / "secret.pt")
    for text in ("../secret.pt\n", "\xff" * 10, "step-1.pt" * 10000):
        (tmp_path / "checkpoints" / "last").write_text(text, encoding="latin-1")
        with pytest.raises(InputError, match="last"):
            resolve_checkpoint(tmp_path / "checkpoints" / "last")


def _training_checkpoint(path: Path, ema: dict, config: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = WeTok(TINY)
    torch.save({"task": "tokenizer", "model_config": config or TINY.to_dict(), "generator": model.state_dict(),
                "ema": ema}, path)
    return path


def test_training_checkpoint_with_bad_ema_or_config(tmp_path):
    from wetok.train.checkpoints import export

    with torch.device("meta"):
        wide = WeTok(TINY.replace(channels=64)).state_dict()
    torch.manual_seed(0)
    ema = {f"module.{k}": torch.zeros(v.shape) for k, v in WeTok(TINY).state_dict().items()}
    ema["module.encoder.conv_in.weight"] = torch.zeros(wide["encoder.conv_in.weight"].shape)
    ckpt = _training_checkpoint(tmp_path / "ema.pt", ema)
    with pytest.raises(CheckpointError, match=r"EMA weights.*1 tensor has the wrong shape.*encoder.conv_in.weight"):
        export(ckpt, tmp_path / "out")
    for config in ({**TINY.to_dict(), "norm_groups": 0}, [1, 2], {**TINY.to_dict(), "channels": 10**9}):
        with pytest.raises(InputError, match="invalid model_config"):
            export(_training_checkpoint(tmp_path / "config.pt", ema, config), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_official_yaml_with_bad_values_is_one_input_error(tmp_path):
    from wetok.official import read_official_config

    base = ("model:\n  init_args:\n    n_embed: {n}\n    num_codebooks: 4\n    ddconfig:\n      ch: {ch}\n"
            "      ch_mult: [1, 2]\n      num_res_blocks: 1\n      z_channels: 16\n")
    for n, ch in (("abc", 32), (16, "wide"), (0, 32), (15, 32), (16, 10**9), (16, "[1, 2]")):
        (tmp_path / "c.yaml").write_text(base.format(n=n, ch=ch))
        with pytest.raises(InputError, match="c.yaml"):
            read_official_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("[" * 100000)
    with pytest.raises(InputError, match="c.yaml"):
        read_official_config(tmp_path / "c.yaml")


# ------------------------------------------------------------------------------------------- training recipes
BAD_OVERRIDES = [
    ("trainer.max_steps=abc", "trainer.max_steps must be an integer"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("data.image_size=[1, 2]", "data.image_size must be an integer"),
    ("data.image_size=33", "multiple of the model's downsampling factor"),
    ("optim.betas=[0.5]", "optim.betas must be a list of 2 numbers"),
    ("optim.betas=[0.5, 1.5]", "optim.betas"),
    ("trainer.ema=yes please", "trainer.ema must be true or false"),
    ("trainer.seed=-1", "trainer.seed must be >= 0"),
    ("optim.lr=.nan", "optim.lr must be > 0"),
    ("data.batch_size=0", "data.batch_size"),
    ("model.overrides.norm_groups=0", "norm_groups must be at least 1"),
    ("model.overrides.num_res_blocks=10000000", "num_res_blocks must be at most"),
    ("model.overrides=[1]", "model.overrides must be a mapping"),
    ("samples.top_p=0", "samples.top_p must be > 0"),
    ("trainer.max_minutes=-5", "trainer.max_minutes must be > 0"),
    ("data.views=[center, 3]", "data.views must be a list of strings"),
    ("optim.lr=" + "[" * 5000, "cannot parse the value of optim.lr"),
]


def test_bad_recipe_values_are_one_input_error(tmp_path):
    from wetok.train.config import load_config

    recipe = write_recipe(tmp_path / "r.yaml")
    for override, expected in BAD_OVERRIDES:
        with pytest.raises(InputError, match="override|r.yaml") as caught:
            load_config(recipe, [override])
        assert expected in str(caught.value) and "\n" not in str(caught.value), (override, str(caught.value))
    (tmp_path / "types.yaml").write_text(TINY_RECIPE + "optim: {lr: fast}\n")
    with pytest.raises(InputError, match="types.yaml.*optim.lr must be a number, got 'fast'"):
        load_config(tmp_path / "types.yaml")
    assert load_config(recipe, ["trainer.precision=32", "optim.lr=1e-4"]).optim.lr == 1e-4  # YAML-1.1 quirks


def test_train_refuses_bad_recipes_before_creating_the_run_folder(tmp_path):
    """Subprocesses: bad values and a missing data folder give one line and leave no run folder."""
    recipe = write_recipe(tmp_path / "r.yaml")
    images = make_images(tmp_path / "images", 2)
    out = tmp_path / "run"
    for args, contains in (
        (["data.train=" + str(tmp_path / "nowhere"), "trainer.max_steps=1"], ("nowhere", "data.train")),
        (["data.train=" + str(images), "trainer.max_steps=abc"], "trainer.max_steps must be an integer"),
    ):
        line = assert_refused(run_wetok("train", recipe, *args, "-o", out, cwd=tmp_path), contains=contains,
                              peak_mib=PEAK_MIB)
        assert line.startswith("wetok train: error:"), line
        assert not out.exists()


# --------------------------------------------------------------------------------------------- subprocesses
def test_hostile_model_folders_and_checkpoints_on_the_command_line(tmp_path):
    """A huge-but-small config, a text .ckpt and a training checkpoint with a wrong-shaped EMA tensor, each
    refused by `wetok` in one line with bounded memory and no output."""
    from PIL import Image

    Image.new("RGB", (16, 16), (10, 200, 30)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    huge = _folder(tmp_path / "huge", {**TINY.to_dict(), "channels": 2**14, "norm_groups": 32})
    assert_refused(run_wetok("encode", tmp_path / "a.png", "--model", huge, "-o", out, "-q", cwd=tmp_path),
                   contains=("config.json", "parameters", "WETOK_MAX_PARAMETERS"), output=out, peak_mib=PEAK_MIB)
    # under the bound (1.7e9 parameters, 6 GiB) but with tiny-f8's weights: refused from the weights' header,
    # before the model is built
    big = _folder(tmp_path / "big", {**get_config("GeneralDomain_compratio768").to_dict()})
    assert_refused(run_wetok("encode", tmp_path / "a.png", "--model", big, "-o", out, "-q", cwd=tmp_path),
                   contains=("model.safetensors", "weights do not match the model", "missing"), output=out, peak_mib=PEAK_MIB)
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    line = assert_refused(run_wetok("encode", tmp_path / "a.png", "--model", tmp_path / "text.ckpt", "--config",
                                    "tiny-f8", "-o", out, "-q", cwd=tmp_path), contains="text.ckpt", output=out,
                          peak_mib=PEAK_MIB)
    assert "weights_only" not in line
    with torch.device("meta"):
        wide = WeTok(TINY.replace(channels=64)).state_dict()
    torch.manual_seed(0)
    ema = {f"module.{k}": v for k, v in WeTok(TINY).state_dict().items()}
    ema["module.decoder.conv_in.weight"] = torch.zeros(wide["decoder.conv_in.weight"].shape)
    ckpt = _training_checkpoint(tmp_path / "step-00000001.pt", ema)
    assert_refused(run_wetok("export", ckpt, "-o", out, cwd=tmp_path),
                   contains=("1 tensor has the wrong shape", "decoder.conv_in.weight"), output=out, peak_mib=PEAK_MIB)


def test_train_checks_paths_of_both_tasks_before_creating_anything(tmp_path):
    from wetok.train import load_config, train

    recipe = write_recipe(tmp_path / "r.yaml")
    (tmp_path / "file.txt").write_text("not a token-shard folder\n")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    generator = ["trainer.task=generator", "model.preset=ar-tiny", "data.micro_batch_size=2", "data.batch_size=2"]
    for overrides, expected in (
        (generator, "data.train is not set"),
        ([*generator, f"data.train={tmp_path / 'file.txt'}"], "data.train: not a folder"),
        ([*generator, f"data.train={tmp_path / 'empty'}", f"model.init={tmp_path / 'none.pt'}"],
         "model.init: no such file"),
        ([f"data.train={tmp_path / 'empty'}", f"data.val={tmp_path / 'nope'}"], "data.val: no such file"),
        ([f"data.train={tmp_path}/shard-{{000..999999999}}.tar"], "more than 1000000 shards"),
        ([f"data.train={tmp_path / 'empty'}"], "no image files"),
        # found after the run folder was started (its train_files.txt written): the folder is removed again
        ([f"data.train={make_images(tmp_path / 'images', 2)}", f"data.val={tmp_path / 'empty'}"], "no image files"),
    ):
        with pytest.raises(InputError, match=expected):
            train(load_config(None if overrides[0] == generator[0] else recipe, overrides), out)
        assert not out.exists(), overrides
