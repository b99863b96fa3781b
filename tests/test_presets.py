from pathlib import Path

import pytest
import torch

from conftest import OFFICIAL_KEYS
from wetok import WeTok, get_config, list_presets

# without the shared folder: one placeholder that the shared marker fails (CI=true) or skips
OFFICIAL_FILES = sorted(OFFICIAL_KEYS.glob("*.txt")) if OFFICIAL_KEYS.is_dir() else [OFFICIAL_KEYS / "missing"]


def _official_keys(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.mark.shared(OFFICIAL_KEYS)
@pytest.mark.parametrize("path", OFFICIAL_FILES, ids=lambda p: p.stem)
def test_official_preset_state_dict_matches_official_keys(path):
    with torch.device("meta"):
        model = WeTok.from_preset(path.stem)  # the _imagenet / _mscoco file names are aliases
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _official_keys(path)
    model_keys = {k: v for k, v in official.items() if k.startswith(("encoder.", "decoder."))}
    assert ours == model_keys  # official names map one to one; upsampler permutation keeps shapes
    ema = {k for k in official if k.startswith("model_ema.")}
    assert {"model_ema." + k.replace(".", "") for k in ours} <= ema
    assert all(k.startswith(("loss.", "model_ema.", "encoder.", "decoder.")) for k in official)


@pytest.mark.parametrize(
    "name,encoder,decoder",
    [
        ("ImageNet_downsample8", 193_622_560, 254_258_947),
        ("GeneralDomain_compratio24", 193_655_360, 254_750_467),
        ("ImageNet_downsample16", 198_935_328, 261_358_851),
        ("GeneralDomain_compratio768", 720_160_544, 953_518_339),
    ],
)
def test_parameter_counts_match_measured_official(name, encoder, decoder):
    with torch.device("meta"):
        counts = WeTok.from_preset(name).num_parameters()
    assert (counts["encoder"], counts["decoder"]) == (encoder, decoder)


@pytest.mark.parametrize(
    "name,ratio", [("GeneralDomain_compratio24", 24), ("GeneralDomain_compratio48", 48),
                   ("GeneralDomain_compratio192", 192), ("GeneralDomain_compratio768", 768)]
)
def test_compression_ratios(name, ratio):
    assert get_config(name).compression_ratio() == ratio


@pytest.mark.parametrize("name", [n for n in list_presets(official=False)])
def test_small_presets_run(name):
    torch.manual_seed(0)
    model = WeTok.from_preset(name).eval()
    f = model.downsample_factor
    with torch.no_grad():
        rec = model.reconstruct(torch.zeros(1, 3, 2 * f, 2 * f))
    assert rec.shape == (1, 3, 2 * f, 2 * f) and torch.isfinite(rec).all()
