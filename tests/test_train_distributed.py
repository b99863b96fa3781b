"""Two CPU processes (gloo, torchrun) train to the same weights as one process with the same global batch."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

from train_helpers import load_ckpt, make_images, max_abs_diff, run_cli, write_recipe
from wetok import WeTok
from wetok.train import load_config

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not available")

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "data.micro_batch_size=2"]


def _logged(run_dir, name):
    with open(run_dir / "logs" / "csv" / "version_0" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_images(root / "train", 12)
    write_recipe(root / "tiny.yaml")
    run_cli(["train", "tiny.yaml", "data.train=train", "-o", "one"], cwd=root)
    run_cli(["train", "tiny.yaml", "data.train=train", "-o", "two", *DDP], cwd=root, torchrun=2)
    return root


def test_two_processes_match_one_process(runs):
    one = load_ckpt(runs / "one" / "checkpoints" / "step-00000003.pt")
    two = load_ckpt(runs / "two" / "checkpoints" / "step-00000003.pt")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["data_position"] == two["data_position"] == 12
    # the runs moved the weights far more than the tolerance, so the comparison means something
    torch.manual_seed(0)  # the engine's initialisation: seed, then build the model
    init = WeTok(load_config(runs / "tiny.yaml").model_config()).state_dict()
    assert max_abs_diff(init, one["generator"]) > 2e-4  # Adam moves each weight by ~lr=1e-4 a step
    for key in ("generator", "discriminator", "ema", "lecam"):
        assert max_abs_diff(one[key], two[key]) < 1e-5, key
    for key in ("opt_g", "opt_d"):
        for idx, state in one[key]["state"].items():
            assert max_abs_diff(state, two[key]["state"][idx]) < 1e-5
    # every logged term agrees, the codebook entropy of the all-reduced batch distribution included
    for name in ("train/codebook_entropy", "train/token_entropy", "train/l1", "train/lpips", "train/d_lecam",
                 "train/g_loss", "train/d_hinge"):
        a, b = _logged(runs / "one", name), _logged(runs / "two", name)
        assert len(a) == len(b) == 3
        assert a == pytest.approx(b, abs=1e-5), name


@pytest.mark.slow
def test_per_process_batchnorm_breaks_the_equality(runs):
    """The official discriminator norm ("batch": statistics of each process's own batch) is not equivalent;
    that is why the test above uses norm=sync_batch."""
    run_cli(["train", "tiny.yaml", "data.train=train", "-o", "one_bn", "discriminator.norm=batch"], cwd=runs)
    run_cli(["train", "tiny.yaml", "data.train=train", "-o", "two_bn", "discriminator.norm=batch", *DDP],
            cwd=runs, torchrun=2)
    one = load_ckpt(runs / "one_bn" / "checkpoints" / "step-00000003.pt")
    two = load_ckpt(runs / "two_bn" / "checkpoints" / "step-00000003.pt")
    assert max_abs_diff(one["discriminator"], two["discriminator"]) > 1e-4


_GROUP_SCRIPT = """
import sys, torch.distributed as dist
from wetok.train import load_config, train
own = sys.argv[1] == "own"
if own:
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2] + "/store", rank=0, world_size=1)
cfg = load_config("tiny.yaml", ["data.train=train", "trainer.accelerator=cpu", "trainer.devices=1",
                                "trainer.strategy=ddp"])
train(cfg, sys.argv[2] + "/run")
print("initialized after train:", dist.is_initialized())
"""


@pytest.mark.parametrize("owner", ["train", "own"])
def test_train_destroys_only_the_process_group_it_created(tmp_path, owner):
    """A gloo group left to interpreter teardown can abort a finished run (SIGABRT, "terminate called without an
    active exception"): train() destroys the group Fabric created, and leaves a caller's own group alone."""
    make_images(tmp_path / "train", 4)
    write_recipe(tmp_path / "tiny.yaml")
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-c", _GROUP_SCRIPT, owner, str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialized after train: {owner == 'own'}" in proc.stdout
