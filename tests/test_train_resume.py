"""A run killed with SIGKILL after step K and resumed reaches bit-identical state at step 2K (CPU): every tensor of
the checkpoint, the saved RNG states included (so the two runs would keep drawing the same noise and dropout)."""

from __future__ import annotations

import pytest
import torch

from train_helpers import assert_identical, load_ckpt, make_images, run_cli, write_recipe

K = 3
# GAN on from step 0, EMA, validation and image grids: the work around the steps must not move the RNG either
ARGS = ["data.train=train", "data.val=val", "data.num_workers=1", f"trainer.checkpoint_every={K}",
        f"trainer.max_steps={2 * K}", "trainer.keep_checkpoints=0", f"trainer.val_every={K}",
        f"trainer.image_every={K}", "trainer.ema_warmup=true"]




def test_sigkill_and_resume_is_bit_exact(tmp_path):
    make_images(tmp_path / "train", 10)  # 10 files, 4 per step: epochs wrap mid-run
    make_images(tmp_path / "val", 4, seed=1)
    write_recipe(tmp_path / "tiny.yaml")
    run_cli(["train", "tiny.yaml", "-o", "straight", *ARGS], cwd=tmp_path)

    killed = run_cli(["train", "tiny.yaml", "-o", "resumed", *ARGS], cwd=tmp_path,
                     env={"WETOK_TEST_KILL_AFTER_STEP": str(K)}, check=False)
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]  # SIGKILL, in the middle of step K+1
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*.pt"))
    assert ckpts == [f"step-{K:08d}.pt"]

    # without --resume the folder is refused (one line, exit 2), with it training continues
    refused = run_cli(["train", "tiny.yaml", "-o", "resumed", *ARGS], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    run_cli(["train", "tiny.yaml", "-o", "resumed", "--resume", *ARGS], cwd=tmp_path)

    a = load_ckpt(tmp_path / "straight" / "checkpoints" / f"step-{2 * K:08d}.pt")
    b = load_ckpt(tmp_path / "resumed" / "checkpoints" / f"step-{2 * K:08d}.pt")
    assert a["step"] == b["step"] == 2 * K and a["data_position"] == b["data_position"] == 2 * K * 4
    assert a["rng"]["cpu"].shape[0] == 1
    assert_identical(a, b, "checkpoint")  # every entry: weights, EMA, D, LeCam, optimizers, RNG states, config
    # and the weights did change between K and 2K
    mid = load_ckpt(tmp_path / "straight" / "checkpoints" / f"step-{K:08d}.pt")
    assert not torch.equal(mid["generator"]["decoder.conv_out.weight"], a["generator"]["decoder.conv_out.weight"])


@pytest.mark.slow
def test_stage2_resume_is_bit_exact_with_decoder_noise(tmp_path):
    """Stage 2 draws the generative decoder's noise from the global RNG: its state is checkpointed too."""
    make_images(tmp_path / "train", 10)
    make_images(tmp_path / "val", 4, seed=1)
    write_recipe(tmp_path / "tiny.yaml")
    run_cli(["train", "tiny.yaml", "-o", "stage1", "data.train=train", "trainer.max_steps=1"], cwd=tmp_path)
    args = [*ARGS, "trainer.stage=2", "model.init=stage1/checkpoints/step-00000001.pt"]
    run_cli(["train", "tiny.yaml", "-o", "straight", *args], cwd=tmp_path)
    killed = run_cli(["train", "tiny.yaml", "-o", "resumed", *args], cwd=tmp_path,
                     env={"WETOK_TEST_KILL_AFTER_STEP": str(K)}, check=False)
    assert killed.returncode in (-9, 137)
    run_cli(["train", "tiny.yaml", "-o", "resumed", "--resume", *args], cwd=tmp_path)
    a = load_ckpt(tmp_path / "straight" / "checkpoints" / f"step-{2 * K:08d}.pt")
    b = load_ckpt(tmp_path / "resumed" / "checkpoints" / f"step-{2 * K:08d}.pt")
    assert_identical(a, b, "checkpoint")
