"""Training pieces: recipes, LR schedule, EMA, the data stream, loss wiring per stage, stage-2 initialisation,
an in-process run with its EMA and export. Multi-process and resume tests: test_train_distributed.py,
test_train_resume.py."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import REPO
from train_helpers import TINY_RECIPE, make_images, max_abs_diff, write_recipe
from wetok import WeTok
from wetok.cli.main import main as cli_main
from wetok.data import to_model_range
from wetok.errors import InputError
from wetok.losses import non_saturating_g_loss
from wetok.train import EMA, load_config, train
from wetok.train.data import CropSpec, RandomCropStream, StreamBatchSampler, crop_sample, sample_rng
from wetok.train.module import (
    TrainingLoss,
    build_discriminator,
    build_generator,
    load_training_checkpoint,
    model_from_checkpoint,
    set_stage_mode,
)
from wetok.train.run import lr_factor


# ------------------------------------------------------------------------------------------------------ recipes
def test_recipe_yaml_and_overrides(tmp_path):
    path = write_recipe(tmp_path / "r.yaml")
    cfg = load_config(path, ["optim.lr=2e-4", "optim.betas=[0.5,0.99]", "loss.gan_weight=null",
                             "model.overrides.codebook_form=pooled", "data.train=/x"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.5, 0.99) and cfg.loss.gan_weight is None
    assert cfg.model.overrides["channels"] == 8 and cfg.model.overrides["codebook_form"] == "pooled"
    mc = cfg.model_config()
    assert (mc.channels, mc.groups, mc.bits_per_group, mc.codebook_form) == (8, 2, 4, "pooled")
    assert cfg.data.train == "/x" and cfg.discriminator.norm == "sync_batch"
    with pytest.raises(InputError, match=r"r\.yaml.*unknown key optim\.learning_rate"):
        write_recipe(tmp_path / "r.yaml", TINY_RECIPE + "optim: {learning_rate: 1}\n")
        load_config(tmp_path / "r.yaml")
    with pytest.raises(InputError, match="override.*unknown key trainer.steps"):
        load_config(None, ["trainer.steps=3"])
    with pytest.raises(InputError, match="stage 2 needs model.init"):
        load_config(None, ["trainer.stage=2"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "train").glob("*.yaml")))
def test_shipped_recipes_load(name):
    overrides = ["model.init=x.pt"] if "stage2" in name else []
    cfg = load_config(REPO / "configs" / "train" / f"{name}.yaml", overrides)
    if cfg.task == "tokenizer" and not name.startswith("cpu-"):  # the official settings of spec §4-5
        # (generator recipes: test_train_generator.py)
        assert cfg.data.batch_size == 128 and cfg.trainer.precision == "16-mixed"
        assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.5, 0.9) and cfg.optim.schedule == "constant"
        assert cfg.loss.gan_weight == 0.1 and cfg.loss.lecam_weight == 0.05 and cfg.loss.perceptual_weight == 1.0
        assert cfg.trainer.ema_decay == 0.999 and cfg.discriminator.ndf == 64
        if cfg.trainer.stage == 1:
            mc = cfg.model_config()
            assert (mc.entropy_weight, mc.commitment_weight) == (0.1, 0.25)


def test_lr_schedule_closed_form():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1",
                             "trainer.max_steps=110"])
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(12345, load_config(None)) == 1.0  # constant by default (the paper's finding)


# ---------------------------------------------------------------------------------------------------------- EMA
def test_ema_update_formula_and_frozen_copies():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen: copied, not averaged
    ema = EMA(model, decay=0.9)
    shadow = {k: v.double().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, v in model.state_dict().items():
            frozen = k.startswith("0.")
            shadow[k] = v.double() if frozen else shadow[k] - (1 - 0.9) * (shadow[k] - v.double())
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v.double(), shadow[k], atol=1e-6, rtol=0)
    ema.train()
    assert not ema.module.training and not any(p.requires_grad for p in ema.parameters())


def test_ema_warmup_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(model, decay=0.999, warmup=True)
    expected = model.weight.detach().double().clone()
    for n in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        assert ema.current_decay() == pytest.approx((1 + n) / (10 + n))
        d = (1 + n) / (10 + n)
        expected = expected - (1 - d) * (expected - model.weight.detach().double())
        ema.update(model)
    torch.testing.assert_close(ema.module.weight.double(), expected, atol=1e-6, rtol=0)
    assert int(ema.state_dict()["num_updates"]) == 5  # checkpointed
    assert EMA(model, decay=0.999).current_decay() == 0.999  # official: no warm-up


# --------------------------------------------------------------------------------------------------------- data
def test_stream_partitions_the_global_batch_and_resumes():
    n = 10
    one = iter(StreamBatchSampler(n, 4, seed=3))
    ranks = [iter(StreamBatchSampler(n, 2, seed=3, rank=r, world=2)) for r in range(2)]
    seen = []
    for _ in range(5):
        batch = next(one)
        assert batch == next(ranks[0]) + next(ranks[1])  # rank r takes the r-th slice of each global batch
        seen += batch
    assert [p for _, p in seen] == list(range(20))
    assert sorted(i for i, _ in seen[:10]) == list(range(10))  # each epoch is a permutation
    assert [i for i, _ in seen[:10]] != [i for i, _ in seen[10:]]  # reshuffled per epoch
    resumed = iter(StreamBatchSampler(n, 4, seed=3, start=12))
    assert next(resumed) == seen[12:16]


def test_crop_is_a_function_of_seed_and_position(tmp_path):
    img = Image.fromarray((torch.rand(50, 70, 3) * 255).byte().numpy())
    a = crop_sample(img, 32, sample_rng(0, 5))
    assert torch.equal(a, crop_sample(img, 32, sample_rng(0, 5)))
    assert not torch.equal(a, crop_sample(img, 32, sample_rng(0, 6)))
    # reference: torchvision resize of the short side, then tensor slicing at the same offsets
    rng = sample_rng(0, 5)
    resized = TF.pil_to_tensor(TF.resize(img, 32, antialias=True))
    top, left = rng.randint(0, resized.shape[1] - 32), rng.randint(0, resized.shape[2] - 32)
    assert resized.shape[1] == 32 and resized.shape[2] == int(70 * 32 / 50)  # torchvision truncates
    assert torch.equal(a, to_model_range(resized[:, top : top + 32, left : left + 32]))


def test_crop_from_a_larger_resize(tmp_path):
    """data.resize_size: the short side goes to resize_size, then an image_size crop (reference: torchvision)."""
    img = Image.fromarray((torch.rand(50, 70, 3) * 255).byte().numpy())
    a = CropSpec(16, resize=40)(img, sample_rng(1, 2))
    rng = sample_rng(1, 2)
    resized = TF.pil_to_tensor(TF.resize(img, 40, antialias=True))
    assert resized.shape[1:] == (40, 56)
    top, left = rng.randint(0, 40 - 16), rng.randint(0, 56 - 16)
    assert torch.equal(a, to_model_range(resized[:, top : top + 16, left : left + 16]))
    assert torch.equal(CropSpec(16, resize=16)(img, sample_rng(1, 2)), crop_sample(img, 16, sample_rng(1, 2)))
    with pytest.raises(ValueError, match="at least the crop size"):
        CropSpec(32, resize=16)
    with pytest.raises(InputError, match="resize_size .16. must be at least data.image_size .32."):
        load_config(None, ["data.image_size=32", "data.resize_size=16"])
    assert load_config(None, ["data.image_size=32", "data.resize_size=64"]).data.resize_size == 64


def test_unreadable_files_are_replaced_and_counted(tmp_path):
    make_images(tmp_path, 3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    files = sorted(tmp_path.iterdir())
    bad = [i for i, f in enumerate(files) if f.name == "bad.png"][0]
    ds = RandomCropStream(files, CropSpec(32), seed=0)
    item = ds[(bad, 7)]
    assert item["skipped"] >= 1 and item["index"] != bad and item["image"].shape == (3, 32, 32)
    assert ds[(0, 7)]["skipped"] == 0


# ------------------------------------------------------------------------------------------------------- losses
def test_generator_loss_terms_per_stage():
    torch.manual_seed(0)
    cfg1 = load_config(None, [f"model.overrides={{{_TINY_ARCH}}}", "loss.perceptual_net=alex",
                              "loss.perceptual_pretrained=false", "discriminator.ndf=8"])
    model = WeTok(cfg1.model_config()).train()
    d = build_discriminator(cfg1).requires_grad_(False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    loss1 = TrainingLoss(cfg1)
    total, logs = loss1.generator_loss(x, out, d, step=0)
    rec = out.reconstruction
    l1 = (x - rec).abs().mean()
    lp = loss1.perceptual(x, rec).mean()
    g = non_saturating_g_loss(d(rec))
    torch.testing.assert_close(total, l1 + lp + out.quantizer.loss + 0.1 * g)
    assert set(logs) >= {"l1", "lpips", "g_loss", "quantizer_loss", "token_entropy", "codebook_entropy",
                         "commitment", "g_total"}
    cfg2 = load_config(None, [f"model.overrides={{{_TINY_ARCH}}}", "loss.perceptual_net=alex",
                              "loss.perceptual_pretrained=false", "trainer.stage=2", "model.init=x",
                              "loss.gan_start=5"])
    loss2 = TrainingLoss(cfg2)
    loss2.load_state_dict(loss1.state_dict())
    total2, logs2 = loss2.generator_loss(x, out, d, step=0)  # stage 2 before gan_start: L1 + LPIPS only
    torch.testing.assert_close(total2, l1 + lp)
    assert "quantizer_loss" not in logs2 and "g_loss" not in logs2


def test_lowpass_term_is_the_l1_of_block_means():
    """loss.lowpass_weight adds weight * mean |block means of x - block means of x̂| (float64 loop reference)."""
    cfg = load_config(None, [f"model.overrides={{{_TINY_ARCH}}}", "loss.perceptual_weight=0", "trainer.stage=2",
                             "model.init=x", "loss.gan_start=5", "loss.lowpass_weight=3", "loss.lowpass_factor=4"])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 12, generator=g) * 2 - 1
    rec = torch.rand(2, 3, 16, 12, generator=g) * 2 - 1
    out = SimpleNamespace(reconstruction=rec, quantizer=None)
    total, logs = TrainingLoss(cfg).generator_loss(x, out, None, step=0)
    xd, rd = x.double(), rec.double()
    diffs = [abs(xd[n, c, i:i + 4, j:j + 4].mean() - rd[n, c, i:i + 4, j:j + 4].mean())
             for n in range(2) for c in range(3) for i in range(0, 16, 4) for j in range(0, 12, 4)]
    lowpass = sum(diffs) / len(diffs)
    assert abs(logs["lowpass_l1"].item() - lowpass) < 1e-6
    assert abs(total.item() - ((xd - rd).abs().mean().item() + 3 * lowpass)) < 1e-5
    for bad in ("loss.lowpass_weight=-1", "loss.lowpass_factor=0"):
        with pytest.raises(InputError, match=bad.split("=")[0]):
            load_config(None, [bad])


_TINY_ARCH = "channels: 8, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 8, groups: 2, bits_per_group: 4, norm_groups: 4"


# ----------------------------------------------------------------------------------------- runs, stage 2, export
@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    make_images(root / "train", 8)
    make_images(root / "val", 4, seed=1)
    write_recipe(root / "tiny.yaml")
    cfg = load_config(root / "tiny.yaml", [f"data.train={root / 'train'}", f"data.val={root / 'val'}",
                                           "trainer.max_steps=2", "trainer.checkpoint_every=1",
                                           "trainer.keep_checkpoints=0", "trainer.image_every=2",
                                           "trainer.val_every=2"])
    last = train(cfg, root / "run")
    return root, cfg, last


def test_run_writes_checkpoints_logs_images_and_ema(stage1):
    root, cfg, last = stage1
    run = root / "run"
    assert last == run / "checkpoints" / "step-00000002.pt"
    assert (run / "images" / "step-00000002.png").is_file() and (run / "config.yaml").is_file()
    assert list((run / "logs" / "tensorboard").rglob("events.out.tfevents*"))
    metrics = (run / "logs" / "csv" / "version_0" / "metrics.csv").read_text()
    for name in ("train/l1", "train/lpips", "train/g_loss", "train/d_hinge", "train/d_lecam", "train/token_entropy",
                 "train/codebook_entropy", "train/commitment", "val/l1", "val/psnr"):
        assert name in metrics
    c1, c2 = (load_training_checkpoint(run / "checkpoints" / f"step-0000000{i}.pt") for i in (1, 2))
    torch.manual_seed(cfg.trainer.seed)
    init = WeTok(cfg.model_config()).state_dict()
    d = cfg.trainer.ema_decay
    assert int(c2["ema"]["num_updates"]) == 2
    for k, v in c2["ema"].items():
        if not k.startswith("module."):
            continue
        k = k.removeprefix("module.")
        e1 = init[k].double() - (1 - d) * (init[k].double() - c1["generator"][k].double())
        e2 = e1 - (1 - d) * (e1 - c2["generator"][k].double())
        torch.testing.assert_close(v.double(), e2, atol=1e-7, rtol=0)
    assert c2["lecam"]["ema_real"].item() != 0.0 and c2["data_position"] == 8


def test_export_writes_the_ema_weights(stage1, tmp_path):
    root, _, last = stage1
    assert cli_main(["export", str(root / "run"), "-o", str(tmp_path / "model")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    model = WeTok.from_pretrained(tmp_path / "model")
    ema = {k.removeprefix("module."): v for k, v in load_training_checkpoint(last)["ema"].items() if k.startswith("module.")}
    assert max_abs_diff(model.state_dict(), ema) == 0.0
    # the checkpoints/last pointer names the same checkpoint
    assert cli_main(["export", str(root / "run" / "checkpoints" / "last"), "-o", str(tmp_path / "via-last")]) == 0
    assert max_abs_diff(WeTok.from_pretrained(tmp_path / "via-last").state_dict(), ema) == 0.0
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "last").write_text("step-00000099.pt\n")
    assert cli_main(["export", str(tmp_path / "dangling" / "last"), "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    (tmp_path / "garbage.pt").write_bytes(b"\xff\xfe not a checkpoint")
    with pytest.raises(InputError, match="garbage.pt: cannot read training checkpoint") as caught:
        load_training_checkpoint(tmp_path / "garbage.pt")
    assert "\n" not in str(caught.value)  # one line, not torch's weights_only essay


def test_stage2_decoder_equals_stage1_decoder_at_init(stage1):
    root, cfg1, last = stage1
    cfg2 = load_config(root / "tiny.yaml", ["trainer.stage=2", f"model.init={last}"])

    ref = model_from_checkpoint(load_training_checkpoint(last))
    g2 = set_stage_mode(build_generator(cfg2), stage=2)
    assert g2.config.generative_decoder and not ref.config.generative_decoder
    assert g2.model_id == ref.model_id  # the stage-2 model decodes the stage-1 tokens
    assert not g2.encoder.training and not any(p.requires_grad for p in g2.encoder.parameters())
    assert g2.decoder.training and all(p.requires_grad for p in g2.decoder.parameters())
    codes = torch.randint(0, 2, (2, 8, 4, 4)).float() * 2 - 1
    expected = ref.decode_codes(codes)
    g2.eval()
    for seed in range(3):
        noise = torch.randn(codes.shape, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        torch.testing.assert_close(g2.decode_codes(codes, noise=noise), expected, atol=1e-6, rtol=1e-5)


def test_stage2_run_keeps_the_encoder_frozen(stage1):
    root, _, last = stage1
    cfg2 = load_config(root / "tiny.yaml", ["trainer.stage=2", f"model.init={last}", f"data.train={root / 'train'}",
                                            "trainer.max_steps=1", "trainer.checkpoint_every=1"])
    out = train(cfg2, root / "run2")
    ckpt = load_training_checkpoint(out)
    stage1_ema = {k: v for k, v in load_training_checkpoint(last)["ema"].items() if "encoder" in k}
    assert max_abs_diff({k: ckpt["ema"][k] for k in stage1_ema}, stage1_ema) == 0.0
    assert max_abs_diff({k: ckpt["generator"][k.removeprefix("module.")] for k in stage1_ema},
                        {k: v for k, v in stage1_ema.items()}) == 0.0
    assert ckpt["model_config"]["generative_decoder"] is True
    assert ckpt["generator"]["decoder.conv_in.weight"].shape[1] == 16  # 2 * z_channels


def test_cli_reports_bad_overrides_in_one_line(tmp_path, capsys):
    write_recipe(tmp_path / "tiny.yaml")
    code = cli_main(["train", str(tmp_path / "tiny.yaml"), "-o", str(tmp_path / "out"), "optim.lrr=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "optim.lrr" in err[0]
    assert not (tmp_path / "out").exists()


def test_bf16_mixed_precision_trains(stage1, tmp_path):
    root, _, _ = stage1
    cfg = load_config(root / "tiny.yaml", [f"data.train={root / 'train'}", "trainer.precision=bf16-mixed",
                                           "trainer.max_steps=2", "trainer.checkpoint_every=2"])
    ckpt = load_training_checkpoint(train(cfg, tmp_path / "run"))
    torch.manual_seed(cfg.trainer.seed)
    init = WeTok(cfg.model_config()).state_dict()
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values())
    assert ckpt["generator"]["decoder.conv_out.weight"].dtype == torch.float32  # mixed: float32 master weights
    assert max_abs_diff(init, ckpt["generator"]) > 1e-4
    metrics = (tmp_path / "run" / "logs" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "nan" not in metrics[-1] and "train/d_hinge" in metrics[0]
