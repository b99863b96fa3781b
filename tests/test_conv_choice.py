"""The float32 fast path's per-shape kernel choice (wetok._convchoice): measured once, cached per machine and torch
version, forced or fixed by WETOK_CONV_CHOICE; results stay within float32 round-off of float64 whatever it picks."""

from __future__ import annotations

import json

import pytest
import torch

from wetok import _convchoice, _cpu
from wetok.fast import WinogradConv2d, inference, nnpack_available

pytestmark = pytest.mark.skipif(not nnpack_available(), reason="this PyTorch build has no NNPACK")


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A private cache folder, measure mode, and no choices remembered from earlier tests."""
    monkeypatch.setenv("WETOK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("WETOK_CONV_CHOICE", "measure")
    monkeypatch.setattr(_convchoice, "_memory", {})
    return tmp_path


@pytest.fixture
def nnpack_calls(monkeypatch):
    calls = []
    original = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or original(*a))
    return calls


def conv(channels: int = 128, seed: int = 0) -> WinogradConv2d:
    torch.manual_seed(seed)
    layer = torch.nn.Conv2d(channels, channels, 3, padding=1)
    layer.__class__ = WinogradConv2d
    return layer


def reference(layer: WinogradConv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)


def fake_times(monkeypatch, winograd: float, direct: float) -> list[dict]:
    """Replace the timing by fixed figures; returns the list of timed kernel sets (one per measurement)."""
    measured = []

    def best_times(runs):
        measured.append(runs)
        return {"winograd": winograd, "direct": direct}

    monkeypatch.setattr(_convchoice, "_best_times", best_times)
    return measured


def test_measured_choice_is_cached_per_machine_and_used(cache, monkeypatch, nnpack_calls):
    layer = conv()
    x = torch.randn(1, 128, 24, 24)
    measured = fake_times(monkeypatch, winograd=1.0, direct=2.0)
    with inference():
        out = layer(x)
        assert len(measured) == 1 and nnpack_calls == [1]  # Winograd measured faster: it ran
        layer(x)
        assert len(measured) == 1  # the same shape is not measured twice
    assert (out.double() - reference(layer, x)).abs().max() < 1e-4
    path = _convchoice.cache_path()
    assert path.parent == cache and _cpu.cpu_key() in path.name and torch.__version__.split("+")[0] in path.name
    data = json.loads(path.read_text())
    (key, entry), = data["choices"].items()
    assert "128->128" in key and "batch~2^0 pixels~2^9" in key and f"threads={torch.get_num_threads()}" in key
    assert entry == {"choice": "winograd", "winograd_s": 1.0, "direct_s": 2.0}

    # a new process (empty memory) reads the file instead of measuring, also for a map of about the same size;
    # a smaller one is measured and added
    monkeypatch.setattr(_convchoice, "_memory", {})
    measured = fake_times(monkeypatch, winograd=2.0, direct=1.0)
    nnpack_calls.clear()
    small = torch.randn(1, 128, 12, 12)
    with inference():
        layer(x)
        layer(torch.randn(1, 128, 20, 26))  # 520 pixels: the same size class as 24 x 24 = 576
        assert measured == [] and nnpack_calls == [1, 1]
        out_small = layer(small)
        assert len(measured) == 1 and nnpack_calls == [1, 1]  # direct measured faster: NNPACK not called
    assert (out_small.double() - reference(layer, small)).abs().max() < 1e-4
    assert len(json.loads(path.read_text())["choices"]) == 2


def test_real_measurement_picks_a_kernel_and_matches_float64(cache, nnpack_calls):
    layer = conv(seed=1)
    x = torch.randn(2, 128, 20, 20).contiguous(memory_format=torch.channels_last)
    with inference():
        out = layer(x)
        choice = layer.kernel_choice(x)
    entry = next(iter(json.loads(_convchoice.cache_path().read_text())["choices"].values()))
    assert entry["choice"] == choice in ("winograd", "direct")
    assert entry["winograd_s"] > 0 and entry["direct_s"] > 0
    assert (entry["winograd_s"] < _convchoice.MARGIN * entry["direct_s"]) == (choice == "winograd")
    assert nnpack_calls  # both kernels were timed
    assert (out.double() - reference(layer, x)).abs().max() < 1e-4


@pytest.mark.parametrize("content", ["not json", "[]", '{"format": 2, "choices": {"k": {"choice": "fft"}}}'])
def test_a_malformed_cache_file_is_ignored_and_replaced(cache, monkeypatch, content):
    path = _convchoice.cache_path()
    path.write_text(content)
    measured = fake_times(monkeypatch, winograd=1.0, direct=2.0)
    with inference():
        conv()(torch.randn(1, 128, 16, 16))
    assert len(measured) == 1
    assert json.loads(path.read_text())["format"] == 2


def test_forced_kernels_and_bad_mode(cache, monkeypatch, nnpack_calls):
    layer = conv()
    big, small = torch.randn(1, 128, 64, 64), torch.randn(1, 128, 8, 8)
    measured = fake_times(monkeypatch, winograd=1.0, direct=2.0)
    with inference():
        monkeypatch.setenv("WETOK_CONV_CHOICE", "direct")
        out = layer(big)
        assert nnpack_calls == []
        monkeypatch.setenv("WETOK_CONV_CHOICE", "winograd")
        out_small = layer(small)
        assert nnpack_calls == [1]
        monkeypatch.setenv("WETOK_CONV_CHOICE", "rules")  # the fixed thresholds: by work per map
        assert layer.kernel_choice(big) == "winograd" or torch.get_num_threads() > 3
        assert layer.kernel_choice(small) == "direct"
        monkeypatch.setenv("WETOK_CONV_CHOICE", "fastest")
        with pytest.raises(ValueError, match="WETOK_CONV_CHOICE"):
            layer(small)
    assert measured == [] and not _convchoice.cache_path().exists()
    assert (out.double() - reference(layer, big)).abs().max() < 1e-4
    assert (out_small.double() - reference(layer, small)).abs().max() < 1e-4


def test_cache_folder_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("WETOK_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _convchoice.cache_path().parent == tmp_path / "wetok"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _convchoice.cache_path().parent == tmp_path / "home" / ".cache" / "wetok"


def test_cpu_features_and_key(monkeypatch):
    monkeypatch.setattr(_cpu, "_cpuinfo", lambda: {"model name": "Intel(R) Xeon(R) Platinum 8480+", "cpu family": "6",
                                                   "model": "143", "flags": "avx512f avx512_bf16 amx_tile amx_bf16"})
    assert _cpu.has_amx() and _cpu.has_avx512_bf16()
    line = _cpu.cpu_description()
    assert "Xeon" in line and "family 6, model 143" in line and "AMX-BF16: yes" in line and "AVX512-BF16: yes" in line
    amx_key = _cpu.cpu_key()
    monkeypatch.setattr(_cpu, "_cpuinfo", lambda: {"model name": "AMD EPYC", "flags": "avx512f avx512_bf16"})
    assert not _cpu.has_amx() and "AMX-BF16: no" in _cpu.cpu_description()
    assert _cpu.cpu_key() != amx_key  # another CPU, another cache file


def test_each_kernel_is_timed_on_its_own_layout_whatever_the_input_layout(cache, monkeypatch):
    # a layer's choice sets the layout the next layers get: timing Winograd on a channels_last input would charge
    # it a conversion a chain of Winograd layers pays once, and keep a greedy layer-by-layer choice channels_last
    seen = []
    layer = conv()
    monkeypatch.setattr(WinogradConv2d, "_winograd", lambda self, x: seen.append(("winograd", x.is_contiguous())))
    monkeypatch.setattr(WinogradConv2d, "_direct", lambda self, x: seen.append(
        ("direct", x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())))
    measured = fake_times(monkeypatch, winograd=1.0, direct=2.0)
    x = torch.randn(1, 128, 16, 16)
    for inp in (x.contiguous(memory_format=torch.channels_last), x):  # one size class, one measurement
        assert layer.kernel_choice(inp) == "winograd"
    assert len(measured) == 1
    for run in measured[0].values():
        run()
    assert sorted(seen) == [("direct", True), ("winograd", True)]
