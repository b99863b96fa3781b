"""The model registry: a name means trained weights (bundled or downloaded), random initialisation is explicit and
announced, downloads without a network fail fast in one line, other families register their own entries."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLES
from wetok import (
    InputError,
    ModelEntry,
    Weights,
    WeTok,
    create_model,
    get_config,
    list_models,
    register_model,
    registry,
)
from wetok.cli import common
from wetok.cli.main import build_parser
from wetok.cli.main import main as cli_main
from wetok.official import official_config, to_official_state_dict
from wetok.presets import OFFICIAL_HUB_FILES, OFFICIAL_HUB_REPO, PRESETS
from wetok.registry import CIFAR10_TOKENIZER_DIR, DEFAULT_MODEL_DIR

has_bundled = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no bundled model")


@pytest.fixture
def scratch_registry(monkeypatch):
    """Entries registered in a test are dropped afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))


def _args(*argv: str):
    return build_parser().parse_args(["reconstruct", "x.png", "-o", "y.png", *argv])


# ------------------------------------------------------------------------------------------------ what is registered
def test_every_preset_is_registered_with_what_it_has():
    entries = {e.name: e for e in list_models("tokenizer")}
    bundled = {name: folder for name, folder in (("default", DEFAULT_MODEL_DIR),
                                                 ("cifar10-tokenizer", CIFAR10_TOKENIZER_DIR))
               if (folder / "config.json").is_file()}
    assert set(entries) == set(PRESETS) | set(bundled)
    for name, entry in entries.items():
        if name in OFFICIAL_HUB_FILES:  # the official releases: the Hub file, converted on load
            assert entry.weights == Weights("hub", OFFICIAL_HUB_REPO, OFFICIAL_HUB_FILES[name], format="official")
            assert entry.config == get_config(name, codebook_form="pooled", token_reduction="mean")
        elif name in bundled:
            assert entry.weights.source == "bundled" and Path(entry.weights.location) == bundled[name]
        else:  # the small CPU configurations have no published weights
            assert entry.weights is None and entry.config == get_config(name)
    # aliases: the validation-set suffixes and the official: prefix of earlier releases
    for alias in ("ImageNet_downsample16_imagenet", "official:ImageNet_downsample16"):
        assert registry.find_model(alias) is entries["ImageNet_downsample16"]


@has_bundled
def test_default_name_loads_the_bundled_weights():
    model = WeTok.from_pretrained("default")
    stored = load_file(str(DEFAULT_MODEL_DIR / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(stored)
    for key, value in stored.items():
        assert torch.equal(state[key], value), key
    assert model.name_or_path == "default" and not model.training


def test_name_without_weights_needs_random_init_and_says_so(capsys):
    with pytest.raises(InputError, match="tiny-f8: has no published weights.*--random-init"):
        WeTok.from_pretrained("tiny-f8")
    with pytest.raises(InputError, match="no published weights"):
        common.load_model_from_args(_args("--model", "tiny-f8"))
    with pytest.raises(InputError, match="no published weights"):
        create_model("tiny-f8")
    capsys.readouterr()
    model, spec = common.load_model_from_args(_args("--model", "tiny-f8", "--random-init"))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: tiny-f8 is randomly initialised (seed 0, --random-init), so its outputs are not meaningful"]
    torch.manual_seed(0)  # the CLI's random initialisation is seeded with 0
    reference = WeTok.from_preset("tiny-f8")
    assert torch.equal(model.encoder.conv_in.weight, reference.encoder.conv_in.weight)
    common.load_model_from_args(_args("--model", "tiny-f8", "--random-init", "--quiet"))
    assert capsys.readouterr().err == ""


@has_bundled
def test_small_f8_name_points_to_the_trained_model_of_its_architecture():
    with pytest.raises(InputError, match="or the trained model of the same architecture: default"):
        WeTok.from_pretrained("small-f8")


# ------------------------------------------------------------------------------------------------ downloads
def test_hub_entry_downloads_native_weights(tmp_path, monkeypatch, scratch_registry):
    torch.manual_seed(1)
    published = WeTok.from_preset("tiny-f8")
    published.save_pretrained(tmp_path / "repo")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("local_files_only")))
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr("wetok._hub.hub_reachable", lambda timeout=0: True)
    register_model(ModelEntry("test-native", "tokenizer", get_config("tiny-f8"), Weights("hub", "someone/tiny"),
                              build=WeTok, load=registry._load_tokenizer))
    model = WeTok.from_pretrained("test-native")
    assert calls == [("someone/tiny", True), ("someone/tiny", None)]  # the cache first, then the download
    for key, value in published.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    cli_model, _ = common.load_model_from_args(_args("--model", "test-native", "--no-fast"))
    assert torch.equal(cli_model.decoder.conv_out.weight, published.decoder.conv_out.weight)


def test_hub_entry_converts_an_official_checkpoint(tmp_path, monkeypatch, scratch_registry):
    torch.manual_seed(2)
    config = official_config("tiny-f8")
    original = WeTok(config)
    torch.save({"state_dict": to_official_state_dict(original)}, tmp_path / "WeTok.ckpt")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **kw: str(tmp_path / "WeTok.ckpt"))  # as if cached
    register_model(ModelEntry("test-official", "tokenizer", config,
                              Weights("hub", "someone/official", "x/WeTok.ckpt", format="official"),
                              build=WeTok, load=registry._load_tokenizer))
    model = create_model("test-official")
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def _fake_chatty_hub(monkeypatch):
    """hf_hub_download as it behaves without a network: cache misses, and retry warnings before the error."""
    hub_log = logging.getLogger("huggingface_hub.utils._http")

    def fake(repo_id, filename, **kwargs):
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        for attempt in range(1, 6):
            hub_log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD ...")
            hub_log.warning("Retrying in %ds [Retry %d/5].", 2**attempt, attempt)
        raise huggingface_hub.errors.LocalEntryNotFoundError("An error happened while trying to locate the file\n"
                                                             "on the Hub and we cannot find it in the cache.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)


@pytest.mark.parametrize("reachable", [False, True])
def test_download_without_network_fails_in_one_line(tmp_path, monkeypatch, capfd, reachable):
    _fake_chatty_hub(monkeypatch)
    monkeypatch.setattr("wetok._hub.hub_reachable", lambda timeout=0: reachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    image = sorted(EXAMPLES.glob("*.png"))[0]
    code = cli_main(["reconstruct", str(image), "-o", str(tmp_path / "out.png"),
                     "--model", "official:ImageNet_downsample16"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("wetok reconstruct: error: GrayShine/WeTok/ImageNet/downsample16/WeTok.ckpt: ")
    if not reachable:  # what to do: a local path, the cache folder, HF_HUB_OFFLINE=1
        assert "local model folder" in err[0] and "HF_HUB_OFFLINE=1" in err[0]
        assert str(huggingface_hub.constants.HF_HUB_CACHE) in err[0]
    assert not (tmp_path / "out.png").exists()


def test_offline_mode_uses_the_cache_only(monkeypatch):
    _fake_chatty_hub(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("wetok._hub.hub_reachable", lambda timeout=0: pytest.fail("probed the network offline"))
    with pytest.raises(InputError, match=r"not in the cache folder .* \(HF_HUB_OFFLINE=1"):
        WeTok.from_pretrained("ImageNet_downsample16")


# ------------------------------------------------------------------------------------------------ other families
def test_another_family_registers_its_own_entries(scratch_registry):
    class Generator(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(width, width)

    loaded = []
    entry = register_model(ModelEntry("test-generator", "generator", 4, Weights("hub", "someone/gen"),
                                      aliases=("test-gen",), build=Generator,
                                      load=lambda e, **kw: loaded.append(e.name) or Generator(e.config)))
    assert "test-generator" in [e.name for e in list_models("generator")]
    assert "test-generator" not in [e.name for e in list_models("tokenizer")]
    assert registry.find_model("test-gen") is entry
    assert create_model("test-gen", pretrained=False).proj.in_features == 4 and loaded == []
    create_model("test-generator")
    assert loaded == ["test-generator"]
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelEntry("test-gen", "generator", 4))
    with pytest.raises(InputError, match="is a generator, not a tokenizer"):
        WeTok.from_pretrained("test-generator")
    with pytest.raises(ValueError, match="family"):
        register_model(ModelEntry("test-x", "vocoder", None))


def test_one_resolver_classifies_every_model_form(tmp_path):
    from wetok.cli.models import classify, load_model

    torch.manual_seed(3)
    saved = WeTok.from_preset("tiny-f8")
    saved.save_pretrained(tmp_path / "native")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    forms = {
        str(tmp_path / "native"): "folder",
        str(tmp_path / "run"): "training",  # a wetok train run folder: its last checkpoint
        "missing.pt": "training",
        "WeTok.ckpt": "official",
        "tiny-f8": "registry",
        "official:ImageNet_downsample16": "registry",
        "someone/some-model": "hub",
    }
    assert {spec: classify(spec).kind for spec in forms} == forms
    loaded = load_model(str(tmp_path / "native"))
    assert torch.equal(loaded.encoder.conv_in.weight, saved.encoder.conv_in.weight)
    assert loaded.weights_id == saved.weights_id
    with pytest.raises(InputError, match="holds no checkpoints/step-"):
        load_model(str(tmp_path / "run"))
    with pytest.raises(InputError, match="missing.pt: does not exist"):
        load_model("missing.pt")
    with pytest.raises(InputError, match="needs its YAML config"):
        load_model("WeTok.ckpt")


def test_downloads_show_the_hub_progress_bar_unless_quiet(tmp_path, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    from wetok._hub import hub_file

    seen = []

    def fake(repo_id, filename, **kwargs):
        seen.append(are_progress_bars_disabled())
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr("wetok._hub.hub_reachable", lambda timeout=0: True)
    before = are_progress_bars_disabled()
    assert hub_file("someone/repo", "w.ckpt") == tmp_path / "w.ckpt"
    assert hub_file("someone/repo", "w.ckpt", progress=False) == tmp_path / "w.ckpt"
    assert seen == [before, before, True, True] and are_progress_bars_disabled() == before


def test_info_lists_the_registry_with_what_each_entry_has(capsys):
    import json

    assert cli_main(["info", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {e.name for e in list_models()}
    tiny = WeTok(get_config("tiny-f8"))
    assert rows["tiny-f8"]["parameters"] == sum(p.numel() for p in tiny.parameters())
    assert rows["tiny-f8"]["weights"] == "none" and rows["tiny-f8"]["groups_x_bits"] == "4x4"
    official = rows["ImageNet_downsample16"]
    assert official["weights"] == "hub" and official["parameters"] == 460_294_179  # spec section 1.2
    assert official["weights_location"] == f"hub ({OFFICIAL_HUB_REPO}/{OFFICIAL_HUB_FILES['ImageNet_downsample16']})"
    if "default" in rows:
        assert rows["default"]["weights"] == "bundled"
    assert cli_main(["info"]) == 0
    text = capsys.readouterr().out
    assert "tiny-f8" in text and "920,723" in text and "GrayShine/WeTok/ImageNet/downsample16/WeTok.ckpt" in text
