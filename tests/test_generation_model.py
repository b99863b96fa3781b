"""WeTok-AR: the official fixture, the official sizes, causality, RoPE, class dropout, loss, save / load, import."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import FIXTURES
from wetok import CheckpointError, InputError, WeTok
from wetok.generation import WeTokAR, WeTokARConfig, get_ar_config, list_ar_presets
from wetok.generation.model import rope_table
from wetok.generation.official import read_official_ar_config, to_official_state_dict
from wetok.official import load_official

AR_CKPT, AR_YAML = FIXTURES / "tiny_ar_g4b8.ckpt", FIXTURES / "tiny_ar_g4b8.yaml"
TOK_CKPT, TOK_YAML = FIXTURES / "tiny_ds16_g4.ckpt", FIXTURES / "tiny_ds16_g4.yaml"
needs_fixture = pytest.mark.shared(AR_CKPT, AR_YAML, FIXTURES / "tiny_ar_g4b8.outputs.pt")
needs_both = pytest.mark.shared(AR_CKPT, AR_YAML, TOK_CKPT, TOK_YAML)


def tiny(**overrides) -> WeTokAR:
    """A tiny random model with informative (non-zero) heads and no dropout."""
    cfg = dict(num_classes=3, grid_height=3, grid_width=4, groups=3, bits_per_group=3, dim=32, n_head=2,
               spatial_layers=2, intra_layers=2, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = WeTokAR(WeTokARConfig(**cfg)).eval()
    for head in model.head:
        torch.nn.init.normal_(head.weight, std=0.3)
    return model


def random_tokens(model: WeTokAR, batch: int, seed: int = 1) -> torch.Tensor:
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, c.vocab_size, (batch, c.grid_height, c.grid_width, c.groups), generator=gen)


# --------------------------------------------------------------------------------------------- official fixture
@pytest.fixture(scope="module")
def fixture_outputs():
    return torch.load(FIXTURES / "tiny_ar_g4b8.outputs.pt", weights_only=True)


@needs_fixture
def test_official_yaml_config():
    cfg = read_official_ar_config(AR_YAML)
    assert (cfg.num_classes, cfg.grid_height, cfg.grid_width, cfg.groups, cfg.bits_per_group) == (5, 8, 8, 4, 8)
    assert (cfg.dim, cfg.n_head, cfg.spatial_layers, cfg.intra_layers, cfg.ffn_hidden) == (32, 2, 1, 1, 256)
    assert (cfg.token_dropout, cfg.resid_dropout, cfg.class_dropout) == (0.1, 0.1, 0.1)


@needs_fixture
def test_official_fixture_logits(fixture_outputs):
    model = WeTokAR.from_official(AR_CKPT, AR_YAML)
    assert model.tokenizer is None  # the fixture holds transformer.* keys only
    o = fixture_outputs
    with torch.no_grad():
        logits = model(o["indices"].view(3, 8, 8, 4), o["labels"])
    assert logits.shape == (3, 8, 8, 4, 256)
    assert (logits.view(3, 64, 4, 256) - o["logits"]).abs().max() < 2e-5


@needs_fixture
def test_official_fixture_greedy_guided_sampling(fixture_outputs):
    model = WeTokAR.from_official(AR_CKPT, AR_YAML)
    o = fixture_outputs
    indices = model.generate(o["cfg_labels"], cfg_scale=o["cfg_scale"].tolist(), top_k=1)
    assert torch.equal(indices.view(3, 64, 4), o["cfg_greedy_indices"])


@needs_fixture
def test_official_key_names_round_trip():
    official = torch.load(AR_CKPT, weights_only=True)["state_dict"]
    model = WeTokAR.from_official(AR_CKPT, AR_YAML)
    ours = to_official_state_dict(model)
    assert set(ours) == set(official)
    assert all(torch.equal(ours[k], official[k]) for k in official)


@needs_both
def test_official_checkpoint_with_tokenizer_uses_raw_weights(tmp_path):
    """A released AR checkpoint also holds the frozen tokenizer (first_stage_model.*, raw non-EMA weights)."""
    ar_state = torch.load(AR_CKPT, weights_only=True)["state_dict"]
    tok_state = torch.load(TOK_CKPT, weights_only=True)["state_dict"]
    state = dict(ar_state)
    state.update({f"first_stage_model.{k}": v for k, v in tok_state.items() if k.startswith(("encoder.", "decoder."))})
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, tmp_path / "ar.ckpt")
    genstage = yaml.safe_load(AR_YAML.read_text())
    genstage["model"]["init_args"]["first_stage_config"] = {
        "target": "src.WeTok.models.lfqgan.VQModel",
        "params": yaml.safe_load(TOK_YAML.read_text())["model"]["init_args"],
    }
    (tmp_path / "ar.yaml").write_text(yaml.safe_dump(genstage))
    model = WeTokAR.from_official(tmp_path / "ar.ckpt", tmp_path / "ar.yaml")
    raw = load_official(TOK_CKPT, TOK_YAML, ema=False)
    assert isinstance(model.tokenizer, WeTok)
    assert "tokenizer" not in dict(model.named_children())  # its weights are not part of the generator's
    for key, value in raw.state_dict().items():
        assert torch.equal(model.tokenizer.state_dict()[key], value), key


@needs_both
def test_official_import_errors(tmp_path):
    with pytest.raises(CheckpointError):  # the fixture's weights with a config of another width
        WeTokAR.from_official(AR_CKPT, read_official_ar_config(AR_YAML).replace(dim=64, ffn_hidden=None))
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.ckpt"):
        WeTokAR.from_official(tmp_path / "bad.ckpt", AR_YAML)
    (tmp_path / "tok.yaml").write_text(TOK_YAML.read_text())
    with pytest.raises(InputError, match="GenStage"):
        WeTokAR.from_official(AR_CKPT, tmp_path / "tok.yaml")


# ------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("name, millions", [("llama_B_GFQ", 337.1), ("llama_L_GFQ", 796.3),
                                            ("llama_XL_GFQ", 1477.0)])
def test_official_sizes(name, millions):
    with torch.device("meta"):
        model = WeTokAR.from_preset(name)
    assert round(model.num_parameters() / 1e6, 1) == millions
    assert model.config.ffn_hidden == {"llama_B_GFQ": 2816, "llama_L_GFQ": 3584, "llama_XL_GFQ": 4096}[name]


def test_small_presets_take_overrides():
    assert {"ar-tiny", "ar-small", "llama_B_GFQ"} <= set(list_ar_presets())
    model = WeTokAR.from_preset("ar-tiny", grid_height=4, grid_width=4, bits_per_group=8)
    assert (model.config.grid_height, model.config.vocab_size) == (4, 256)
    assert get_ar_config("ar-small", dim=128).ffn_hidden == 512  # recomputed for the new width
    with pytest.raises(KeyError):
        WeTokAR.from_preset("no-such")


def test_official_initialisation():
    model = WeTokAR.from_preset("ar-small")
    assert all(float(h.weight.detach().abs().max()) == 0 for h in model.head)
    w = model.spatial_blocks[0].feed_forward.w1.weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.001 and abs(float(w.mean())) < 0.001


def test_rope_table_matches_formula():
    cfg = WeTokARConfig(grid_height=3, grid_width=5, dim=64, n_head=4)  # head_dim 16: 4 row and 4 column pairs
    table = rope_table(cfg).double()
    assert table.shape == (1 + 15, 8, 2) and table[0].abs().max() == 0  # the class slot: all zeros
    for r in range(3):
        for c in range(5):
            for k in range(8):
                pos, j = (r, k) if k < 4 else (c, k - 4)
                angle = pos * 10000.0 ** (-4 * j / 16)
                expected = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
                assert torch.allclose(table[1 + r * 5 + c, k], expected, atol=1e-6)


def test_logits_are_causal():
    """Changing sub-token i of position t changes exactly the logits after (t, i) in (position, sub-token) order."""
    model = tiny()
    tokens, labels = random_tokens(model, 1), torch.tensor([1])
    with torch.no_grad():
        base = model(tokens, labels).flatten(1, 2)  # (1, positions, g, V)
        g = model.config.groups
        for t, i in [(0, 0), (2, 1), (5, 2), (11, 0)]:
            changed = tokens.clone().flatten(1, 2)
            changed[0, t, i] = (changed[0, t, i] + 1) % model.config.vocab_size
            diff = (model(changed.view_as(tokens), labels).flatten(1, 2) - base).abs().amax(-1)[0]
            order = torch.arange(diff.numel()).view(diff.shape)
            earlier = order <= t * g + i
            assert diff[earlier].max() == 0
            if t * g + i + 1 < diff.numel():
                assert diff[~earlier].max() > 0


def test_class_dropout_only_in_training():
    model = tiny(class_dropout=0.5)
    tokens, labels = random_tokens(model, 64), torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        cond = model(tokens, labels)
        null = model(tokens, torch.full_like(labels, model.config.null_class))
        assert torch.equal(model(tokens, labels), cond)  # eval: never dropped
        model.train()
        out = model(tokens, labels)
    is_cond = (out - cond).flatten(1).abs().amax(1) < 1e-5
    is_null = (out - null).flatten(1).abs().amax(1) < 1e-5
    assert bool((is_cond ^ is_null).all())  # every row is one or the other
    assert 10 < int(is_null.sum()) < 54  # Binomial(64, 0.5): outside this range with probability < 1e-6


def test_loss_is_the_sum_of_per_sub_token_cross_entropies():
    model = tiny()
    tokens, labels = random_tokens(model, 2), torch.tensor([0, 2])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens, labels).double(), -1)
        expected = -logp.gather(-1, tokens[..., None]).squeeze(-1).mean(dim=(0, 1, 2)).sum()
        assert abs(float(model.loss(tokens, labels)) - float(expected)) < 1e-5
    assert float(F.cross_entropy(torch.zeros(1, 8), torch.tensor([0]))) == pytest.approx(math.log(8))


def test_save_load_round_trip_with_tokenizer(tmp_path):
    model = tiny(groups=4, bits_per_group=4, grid_height=2, grid_width=2)
    model.tokenizer = WeTok.from_preset("tiny-f8").eval()
    model.save_pretrained(tmp_path / "ar")
    assert {p.name for p in (tmp_path / "ar").iterdir()} == {"config.json", "model.safetensors", "tokenizer"}
    loaded = WeTokAR.from_pretrained(tmp_path / "ar")
    assert loaded.config == model.config and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, loaded.tokenizer.state_dict()[k]) for k, v in model.tokenizer.state_dict().items())
    assert WeTokARConfig.from_dict(model.config.to_dict()) == model.config
    with pytest.raises(InputError, match="not a WeTok-AR"):  # a tokenizer folder is not a generator
        WeTokAR.from_pretrained(tmp_path / "ar" / "tokenizer")
    (tmp_path / "ar" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="model.safetensors"):
        WeTokAR.from_pretrained(tmp_path / "ar")


def test_config_validation():
    with pytest.raises(ValueError):
        WeTokARConfig(dim=30, n_head=4)
    with pytest.raises(ValueError, match="unknown"):
        WeTokARConfig.from_dict({"dim": 64, "n_head": 4, "bogus": 1})


def test_registry_and_generator_resolver():
    from wetok.generation.pretrained import load_generator
    from wetok.registry import create_model, list_models

    names = {e.name for e in list_models("generator")}
    assert {"llama_B_GFQ", "llama_L_GFQ", "llama_XL_GFQ", "ar-tiny", "ar-small"} <= names
    assert isinstance(create_model("ar-tiny", pretrained=False), WeTokAR)
    a, b = load_generator("ar-tiny", random_init=True), load_generator("ar-tiny", random_init=True)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # seeded: same weights
    with pytest.raises(InputError, match="random-init"):
        load_generator("ar-tiny")  # a configuration only: random weights must be asked for
    with pytest.raises(InputError, match="not a generator"):
        load_generator("tiny-f8", random_init=True)
