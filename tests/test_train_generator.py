"""Generator (WeTok-AR) training on the shared engine: optimizer groups, recipes, the loss on a fixed batch, sample
grids decoded by the tokenizer, export; SIGKILL + resume bit-exact; two processes = one process."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from train_helpers import (
    TINY_AR_RECIPE,
    assert_identical,
    load_ckpt,
    make_token_shards,
    max_abs_diff,
    run_cli,
    write_recipe,
)
from wetok import WeTok
from wetok.errors import InputError
from wetok.generation import WeTokAR
from wetok.train import load_config, train
from wetok.train.checkpoints import load_training_checkpoint
from wetok.train.generator import param_groups
from wetok.train.run import lr_factor

REPO = Path(__file__).resolve().parents[1]
GENERATOR_RECIPES = ("llama_B_GFQ", "llama_L_GFQ", "llama_XL_GFQ")
NO_DROPOUT = ["model.overrides.token_dropout=0", "model.overrides.resid_dropout=0", "model.overrides.ffn_dropout=0",
              "model.overrides.class_dropout=0"]


def _logged(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "logs" / "csv" / "version_0" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


# ------------------------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("decay_all", [False, True])
def test_param_groups_decay_matrices_and_embeddings_only(decay_all):
    model = WeTokAR.from_preset("ar-tiny", dim=16, n_head=2, spatial_layers=1, intra_layers=1)
    # brute force from the module types: Linear / Embedding weights decay, RMSNorm weights do not
    decayed, kept = set(), set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_matrix = isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight"
            (decayed if is_matrix or decay_all else kept).add(id(p))
    assert kept or decay_all  # the model does have norm weights
    groups = param_groups(model, 0.05, decay_all=decay_all)
    assert {id(p) for p in groups[0]["params"]} == decayed and groups[0]["weight_decay"] == 0.05
    assert {id(p) for g in groups[1:] for p in g["params"]} == kept
    assert all(g["weight_decay"] == 0.0 for g in groups[1:])
    # what AdamW then does with a zero gradient: decoupled decay p <- p (1 - lr * wd), nothing else
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt = torch.optim.AdamW(groups, lr=0.5, betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        factor = 1 - 0.5 * 0.05 if id(p) in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[id(p)] * factor, atol=0, rtol=1e-6)


# --------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", GENERATOR_RECIPES)
def test_official_generator_recipes(name):
    path = REPO / "configs" / "train" / f"{name}.yaml"
    cfg = load_config(path)
    o, d, t, m = cfg.optim, cfg.data, cfg.trainer, cfg.model_config()
    assert cfg.task == "generator" and m.name == name
    assert o.betas == (0.9, 0.95) and o.lr == 3e-4 and o.weight_decay == 0.05 and not o.weight_decay_all
    assert o.grad_clip == 1.0 and t.precision == "16-mixed"
    assert (m.class_dropout, m.token_dropout, m.resid_dropout, m.ffn_dropout) == (0.1, 0.1, 0.1, 0.1)
    assert d.batch_size == 3072 == t.devices * t.num_nodes * d.micro_batch_size  # the official split, no accumulation
    # schedule (spec §7.3) in steps: 1000 epochs of 1,281,167 // 3072 steps; 6 epochs of warm-up from 0.005 x,
    # 5% of the run (50 epochs) constant, then linear to 0.1 x
    per_epoch = 1_281_167 // 3072
    assert t.max_steps == 1000 * per_epoch and o.warmup_steps == 6 * per_epoch and o.hold_steps == 50 * per_epoch
    assert lr_factor(0, cfg) == pytest.approx(0.005 + 0.995 / o.warmup_steps)
    assert lr_factor(o.warmup_steps - 1, cfg) == pytest.approx(1.0)
    assert lr_factor(o.warmup_steps + o.hold_steps - 1, cfg) == 1.0
    mid = (o.warmup_steps + o.hold_steps + t.max_steps) // 2
    frac = (mid - o.warmup_steps - o.hold_steps) / (t.max_steps - o.warmup_steps - o.hold_steps)
    assert lr_factor(mid, cfg) == pytest.approx(1.0 - 0.9 * frac)
    assert lr_factor(t.max_steps, cfg) == pytest.approx(0.1)
    # the product devices x nodes x micro-batch must divide the global batch (the rest is accumulation)
    assert load_config(path, ["trainer.num_nodes=1"]).data.batch_size == 3072  # 8 GPUs, accumulation 6 or more
    for bad in (["trainer.devices=5"], ["data.micro_batch_size=48"], ["data.batch_size=3008"]):
        with pytest.raises(InputError, match=r"batch_size .* must be trainer.devices"):
            load_config(path, bad)


def test_generator_config_errors(tmp_path):
    recipe = write_recipe(tmp_path / "ar.yaml", TINY_AR_RECIPE)
    assert load_config(recipe).trainer.task == "generator"  # the top-level `task:` key
    with pytest.raises(InputError, match="not a generator configuration"):
        load_config(recipe, ["model.preset=small-f8"])
    with pytest.raises(InputError, match="trainer.task must be one of"):
        load_config(recipe, ["trainer.task=diffusion"])
    make_token_shards(tmp_path / "tok", 8)
    cfg = load_config(recipe, [f"data.train={tmp_path / 'tok'}", "model.overrides.groups=3"])
    with pytest.raises(InputError, match=r"tok: model.overrides disagree with the token shards \(groups 3 vs 2\)"):
        train(cfg, tmp_path / "run")
    cfg = load_config(recipe, [f"data.train={tmp_path / 'tok'}", "samples.classes=[0,3]"])
    with pytest.raises(InputError, match=r"samples.classes \[3\] are not classes of the token data set \(0..2\)"):
        train(cfg, tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


# -------------------------------------------------------------------------------------- loss on a fixed batch
def test_loss_starts_at_log_vocabulary_and_falls_on_a_fixed_batch(tmp_path):
    """The heads start at zero, so the first loss is exactly g * ln(2^d'); with the data set one batch, the loss
    must then fall well below it."""
    make_token_shards(tmp_path / "tok", 4, seed=3)
    recipe = write_recipe(tmp_path / "ar.yaml", TINY_AR_RECIPE)
    cfg = load_config(recipe, [f"data.train={tmp_path / 'tok'}", "trainer.max_steps=25", "trainer.checkpoint_every=25",
                               "optim.weight_decay=0", *NO_DROPOUT])
    train(cfg, tmp_path / "run")
    losses = _logged(tmp_path / "run", "train/loss")
    assert len(losses) == 25
    assert losses[0] == pytest.approx(2 * math.log(8), abs=1e-5)
    assert losses[-1] < 0.4 * losses[0] and losses[-1] < min(losses[:20])
    ckpt = load_training_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000025.pt")
    assert ckpt["task"] == "generator" and ckpt["data_position"] == 100
    # the run's AdamW groups: decay on the >= 2-dim tensors (counted from the saved weights), not on the others
    groups = ckpt["opt"]["param_groups"]
    n_matrices = sum(v.dim() >= 2 for v in ckpt["model"].values())
    assert len(groups[0]["params"]) == n_matrices and len(groups[1]["params"]) == len(ckpt["model"]) - n_matrices
    assert groups[1]["weight_decay"] == 0.0


def test_without_ema_validation_and_export_use_the_live_weights(tmp_path):
    from wetok.cli.main import main as cli_main
    from wetok.token_shards import TokenDataset

    make_token_shards(tmp_path / "tok", 8)
    make_token_shards(tmp_path / "val", 6, seed=1)  # batches of 4 and 2: the average must weight by samples
    recipe = write_recipe(tmp_path / "ar.yaml", TINY_AR_RECIPE)
    cfg = load_config(recipe, [f"data.train={tmp_path / 'tok'}", f"data.val={tmp_path / 'val'}", "trainer.ema=false",
                               "trainer.max_steps=2", "trainer.checkpoint_every=2", "trainer.val_every=2",
                               "trainer.image_every=1"])
    last = train(cfg, tmp_path / "run")
    ckpt = load_training_checkpoint(last)
    assert ckpt["ema"] is None and (tmp_path / "run" / "images" / "step-00000001.png").is_file()
    # val/loss at step 2: sum over sub-tokens of the mean cross-entropy over all 6 samples, in float64
    model = WeTokAR(load_config(recipe).model_config().replace(grid_height=2, grid_width=3, groups=2,
                                                               bits_per_group=3, num_classes=3))
    model.load_state_dict(ckpt["model"])
    model.eval()
    val = TokenDataset(tmp_path / "val")
    indices = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logp = torch.log_softmax(model(indices, labels).double(), dim=-1)
    picked = logp.gather(-1, indices[..., None]).squeeze(-1)  # (N, h, w, g)
    expected = -picked.mean(dim=(0, 1, 2)).sum().item()
    assert _logged(tmp_path / "run", "val/loss")[-1] == pytest.approx(expected, rel=1e-5)
    assert cli_main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "model")]) == 0
    assert max_abs_diff(WeTokAR.from_pretrained(tmp_path / "model").state_dict(), ckpt["model"]) == 0.0


# ------------------------------------------------------------------------------- sample grids, export, resume
@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A 2-step run on shards made by a (random, saved) tokenizer that the shards name."""
    root = tmp_path_factory.mktemp("artok")
    torch.manual_seed(0)
    tokenizer = WeTok.from_preset("small-f8", channels=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=6, groups=2,
                                  bits_per_group=3, norm_groups=4).eval()
    tokenizer.save_pretrained(root / "tokenizer")
    make_token_shards(root / "tok", 12, grid=(2, 2), tokenizer_id=tokenizer.model_id,
                      tokenizer_name=str(root / "tokenizer"))
    make_token_shards(root / "val", 6, grid=(2, 2), seed=1, tokenizer_id=tokenizer.model_id)
    recipe = write_recipe(root / "ar.yaml", TINY_AR_RECIPE)
    cfg = load_config(recipe, [f"data.train={root / 'tok'}", f"data.val={root / 'val'}", "trainer.max_steps=2",
                               "trainer.checkpoint_every=2", "trainer.image_every=2", "trainer.val_every=2",
                               "trainer.ema_warmup=true"])
    last = train(cfg, root / "run")
    return root, cfg, last, tokenizer


def test_sample_grid_is_the_decoded_samples_of_the_ema_model(tokenizer_run):
    from torchvision.utils import make_grid

    from wetok.train.generator import ar_model_from_checkpoint

    root, cfg, last, tokenizer = tokenizer_run
    ckpt = load_training_checkpoint(last)
    model = ar_model_from_checkpoint(ckpt)
    s = cfg.samples
    labels = torch.arange(3).repeat_interleave(s.per_class)  # the 3 classes of the shards
    tokens = model.generate(labels, cfg_scale=s.cfg_scale, generator=torch.Generator().manual_seed(0))
    images = tokenizer.decode(tokens).clamp(-1, 1) * 0.5 + 0.5
    expected = make_grid(images, nrow=s.per_class, padding=2).mul(255).add(0.5).clamp(0, 255).byte()
    saved = torch.from_numpy(np.array(Image.open(root / "run" / "images" / "step-00000002.png"))).permute(2, 0, 1)
    side = 2 * tokenizer.downsample_factor + 2  # decoded images of 2 x 2 tokens, and the grid's padding
    assert saved.shape == expected.shape == (3, 2 + 3 * side, 2 + s.per_class * side)  # a row per class
    assert (saved.int() - expected.int()).abs().max() <= 1
    assert ckpt["tokenizer"] == str(root / "tokenizer") and ckpt["data"]["tokenizer_id"] == tokenizer.model_id
    assert len(_logged(root / "run", "val/loss")) == 2  # the baseline at step 0 and step 2


def test_export_writes_the_ema_generator_and_its_tokenizer(tokenizer_run, tmp_path):
    from wetok.cli.main import main as cli_main

    root, _, last, tokenizer = tokenizer_run
    assert cli_main(["export", str(root / "run"), "-o", str(tmp_path / "model")]) == 0
    model = WeTokAR.from_pretrained(tmp_path / "model")
    ckpt = load_training_checkpoint(last)
    ema = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert max_abs_diff(model.state_dict(), ema) == 0.0
    assert max_abs_diff(model.state_dict(), ckpt["model"]) > 0  # the EMA, not the live weights
    assert model.tokenizer is not None and model.tokenizer.model_id == tokenizer.model_id
    assert max_abs_diff(model.tokenizer.state_dict(), tokenizer.state_dict()) == 0.0
    assert cli_main(["export", str(root / "run"), "-o", str(tmp_path / "raw"), "--raw"]) == 0
    assert max_abs_diff(WeTokAR.from_pretrained(tmp_path / "raw").state_dict(), ckpt["model"]) == 0.0


def test_warm_start_from_a_generator_checkpoint(tokenizer_run, tmp_path):
    root, cfg, last, _ = tokenizer_run
    ema = {k.removeprefix("module."): v for k, v in load_training_checkpoint(last)["ema"].items()
           if k.startswith("module.")}
    warm = load_config(root / "ar.yaml", [f"data.train={root / 'tok'}", f"model.init={last}", "optim.lr=1e-12",
                                          "trainer.max_steps=1", "trainer.checkpoint_every=1"])
    ckpt = load_training_checkpoint(train(warm, tmp_path / "warm"))
    assert max_abs_diff(ckpt["model"], ema) < 1e-9  # started from the EMA weights; a 1e-12 lr barely moves them
    wider = load_config(root / "ar.yaml", [f"data.train={root / 'tok'}", f"model.init={last}",
                                           "model.overrides.dim=48", "model.overrides.n_head=4"])
    with pytest.raises(InputError, match=r"model.init has another architecture than the recipe \(dim, n_head\)"):
        train(wider, tmp_path / "wider")


def test_resume_refuses_other_tokens(tokenizer_run, tmp_path):
    root, _, _, _ = tokenizer_run
    shutil.copytree(root / "run", tmp_path / "run")
    make_token_shards(tmp_path / "other", 12, grid=(2, 2), seed=5)
    code = run_cli(["train", "ar.yaml", "-o", str(tmp_path / "run"), "--resume", f"data.train={tmp_path / 'other'}",
                    "trainer.max_steps=4"], cwd=root, check=False)
    assert code.returncode == 2 and "is not the token data set this run was trained on" in code.stderr


# --------------------------------------------------------------------------------------- processes and resume
K = 3


def test_sigkill_and_resume_is_bit_exact(tmp_path):
    """Dropout and class dropout on: the resumed run must also continue the RNG streams exactly."""
    make_token_shards(tmp_path / "tok", 10)
    make_token_shards(tmp_path / "val", 4, seed=1)
    write_recipe(tmp_path / "ar.yaml", TINY_AR_RECIPE)
    args = ["data.train=tok", "data.val=val", "data.num_workers=1", f"trainer.checkpoint_every={K}",
            f"trainer.max_steps={2 * K}", "trainer.keep_checkpoints=0", f"trainer.val_every={K}",
            f"trainer.image_every={K}", "trainer.ema_warmup=true", "model.overrides.class_dropout=0.5"]
    run_cli(["train", "ar.yaml", "-o", "straight", *args], cwd=tmp_path)
    killed = run_cli(["train", "ar.yaml", "-o", "resumed", *args], cwd=tmp_path,
                     env={"WETOK_TEST_KILL_AFTER_STEP": str(K)}, check=False)
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]
    run_cli(["train", "ar.yaml", "-o", "resumed", "--resume", *args], cwd=tmp_path)
    a = load_ckpt(tmp_path / "straight" / "checkpoints" / f"step-{2 * K:08d}.pt")
    b = load_ckpt(tmp_path / "resumed" / "checkpoints" / f"step-{2 * K:08d}.pt")
    assert a["step"] == 2 * K and a["data_position"] == 2 * K * 4 and a["task"] == "generator"
    assert_identical(a, b, "checkpoint")  # model, EMA, AdamW state, RNG states, data identity, config
    mid = load_ckpt(tmp_path / "straight" / "checkpoints" / f"step-{K:08d}.pt")
    assert not torch.equal(mid["rng"]["cpu"], a["rng"]["cpu"])  # randomness was drawn between K and 2K
    assert max_abs_diff(mid["model"], a["model"]) > 1e-4


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not available")
def test_two_processes_match_one_process(tmp_path):
    make_token_shards(tmp_path / "tok", 12)
    write_recipe(tmp_path / "ar.yaml", TINY_AR_RECIPE)
    args = ["data.train=tok", *NO_DROPOUT]
    run_cli(["train", "ar.yaml", "-o", "one", *args], cwd=tmp_path)
    run_cli(["train", "ar.yaml", "-o", "two", *args, "trainer.accelerator=cpu", "trainer.devices=2",
             "trainer.strategy=ddp", "data.micro_batch_size=1"], cwd=tmp_path, torchrun=2)  # accumulation 2
    one = load_ckpt(tmp_path / "one" / "checkpoints" / "step-00000003.pt")
    two = load_ckpt(tmp_path / "two" / "checkpoints" / "step-00000003.pt")
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["data_position"] == two["data_position"] == 12
    torch.manual_seed(0)  # the engine's initialisation: seed, then build the model
    init = WeTokAR(load_config(tmp_path / "ar.yaml").model_config().replace(
        grid_height=2, grid_width=3, groups=2, bits_per_group=3, num_classes=3)).state_dict()
    assert max_abs_diff(init, one["model"]) > 1e-3  # AdamW moves each weight by ~lr = 3e-3 a step
    assert max_abs_diff(one["model"], two["model"]) < 1e-5
    for k, state in one["opt"]["state"].items():
        assert max_abs_diff(state, two["opt"]["state"][k]) < 1e-5
    assert max_abs_diff(one["ema"], two["ema"]) < 1e-5
    a, b = _logged(tmp_path / "one", "train/loss"), _logged(tmp_path / "two", "train/loss")
    assert len(a) == len(b) == 3 and a == pytest.approx(b, abs=1e-5)


def test_load_tokenizer_refuses_another_architecture_or_other_weights(tmp_path):
    from wetok.train.generator import load_tokenizer

    torch.manual_seed(0)
    made = WeTok.from_preset("tiny-f8")
    made.save_pretrained(tmp_path / "made")
    torch.manual_seed(1)
    WeTok.from_preset("tiny-f8").save_pretrained(tmp_path / "retrained")  # same architecture, other weights
    torch.manual_seed(0)
    WeTok.from_preset("tiny-f16").save_pretrained(tmp_path / "other")

    ok = load_tokenizer(str(tmp_path / "made"), made.model_id, made.weights_id)
    assert ok.weights_id == made.weights_id and not ok.training
    assert load_tokenizer(str(tmp_path / "retrained"), made.model_id).model_id == made.model_id  # no weights id
    with pytest.raises(InputError, match="other trained weights"):
        load_tokenizer(str(tmp_path / "retrained"), made.model_id, made.weights_id)
    with pytest.raises(InputError, match="did not make these tokens"):
        load_tokenizer(str(tmp_path / "other"), made.model_id, made.weights_id)


def test_tokenizer_spec_from_the_shards(tmp_path):
    """The shards' tokenizer is used for sample grids and export when it is a folder or a bundled registered name;
    names without weights, or whose weights need a download, are not."""
    from types import SimpleNamespace

    from wetok.registry import find_model
    from wetok.train.generator import tokenizer_spec

    cfg = SimpleNamespace(model=SimpleNamespace(tokenizer=None))
    bundled = [e.name for e in [find_model("cifar10-tokenizer"), find_model("default")] if e is not None]
    for name in bundled:
        assert tokenizer_spec(cfg, SimpleNamespace(tokenizer_name=name)) == name
    for name in ("small-f8", "ImageNet_downsample16", None, "owner/repo"):
        assert tokenizer_spec(cfg, SimpleNamespace(tokenizer_name=name)) is None
    assert tokenizer_spec(cfg, SimpleNamespace(tokenizer_name=str(tmp_path))) == str(tmp_path.resolve())
    given = SimpleNamespace(model=SimpleNamespace(tokenizer="small-f8"))
    assert tokenizer_spec(given, SimpleNamespace(tokenizer_name="default")) == "small-f8"
