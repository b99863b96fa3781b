"""One training step of the ``cpu-small`` recipe: the training engine against a straightforward loop, same process.

The recipe (configs/train/cpu-small.yaml): the small-f8 tokenizer on 128 px crops, batch 8, L1 + the quantizer's
entropy / commitment loss, GAN off (its ``gan_start`` lies past the run). ``--gan`` switches the GAN on from step 0,
so that a step is a full G + D step (PatchGAN, non-saturating G loss x 0.1, hinge + LeCam D loss).

* ``straightforward``: a plain PyTorch loop written the way one writes it first: float32, NCHW,
  ``G(x)``; L1 + quantizer loss (+ 0.1 x GAN loss with D frozen); backward; Adam step; then the D step on the
  detached reconstruction; then an EMA update parameter by parameter.
* ``engine-fp32``: ``wetok.train.run._Run.train_step`` (Lightning Fabric) with the recipe as is (precision 32).
* ``engine-bf16``: the same with ``trainer.precision=bf16-mixed`` (autocast to bfloat16; the quantizer's entropy
  terms and the losses stay float32).
* ``engine-bf16-cl``: bf16-mixed with the generator and discriminator stored channels_last (to show why the
  fast path keeps NCHW for training: GroupNorm's backward pass is 3-15x slower on channels_last tensors).

Each variant trains its own copy from the same initial weights on the same fixed batch (the recipe's 8 centre crops of
BSDS val photos); one warm-up step each, then ``--reps`` interleaved rounds (ABCD...). CPU time of the process is
reported beside wall time (with ``--threads 1`` it is the work done, whatever the load from other processes).

Run: python benchmarks/bench_train.py --reps 10 [--gan] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_IMAGES, interleaved, load_images, machine, summary  # noqa: E402

from wetok.losses import hinge_d_loss, non_saturating_g_loss  # noqa: E402
from wetok.train.config import load_config  # noqa: E402
from wetok.train.run import _Run  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "train" / "cpu-small.yaml"


class Straightforward:
    """The baseline step, written out in plain PyTorch on copies of the engine's initial G and D."""

    def __init__(self, run: _Run) -> None:
        cfg = run.cfg
        self.G = copy.deepcopy(run.G.module).train()
        self.D = copy.deepcopy(run.D.module).train()
        self.ema = copy.deepcopy(run.G.module).eval().requires_grad_(False)
        self.loss = copy.deepcopy(run.loss)
        o = cfg.optim
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=o.lr, betas=tuple(o.betas))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=o.disc_lr or o.lr, betas=tuple(o.betas))
        self.gan = cfg.loss.gan_start <= 0
        self.gan_weight = cfg.loss.gan_weight
        self.lecam_weight = cfg.loss.lecam_weight
        self.decay = cfg.trainer.ema_decay

    def step(self, x: torch.Tensor) -> None:
        out = self.G(x)
        rec = out.reconstruction
        loss = (x - rec).abs().mean() + out.quantizer.loss
        if self.gan:
            self.D.requires_grad_(False)
            loss = loss + self.gan_weight * non_saturating_g_loss(self.D(rec))
            self.D.requires_grad_(True)
        loss.backward()
        self.opt_g.step()
        self.opt_g.zero_grad()
        if self.gan:
            real, fake = self.D(x), self.D(rec.detach())
            self.loss.lecam.update(real, fake)
            d_loss = hinge_d_loss(real, fake) + self.lecam_weight * self.loss.lecam.penalty(real, fake)
            d_loss.backward()
            self.opt_d.step()
            self.opt_d.zero_grad()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.G.parameters(), strict=True):
                p_ema.mul_(self.decay).add_(p, alpha=1 - self.decay)


def engine(overrides: list[str], folder: Path, channels_last: bool = False) -> _Run:
    torch.manual_seed(0)
    cfg = load_config(RECIPE, overrides)
    cfg.trainer.progress_bar = False
    run = _Run(cfg, folder, resume=False)
    run.build()
    if channels_last:
        run.G.module.to(memory_format=torch.channels_last)
        run.D.module.to(memory_format=torch.channels_last)
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--gan", action="store_true", help="GAN from step 0: every step is a G + D step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--images", default=DEFAULT_IMAGES)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    overrides = ["loss.gan_start=0"] if args.gan else []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "engine-fp32": engine(overrides, Path(tmp) / "fp32"),
            "engine-bf16": engine([*overrides, "trainer.precision=bf16-mixed"], Path(tmp) / "bf16"),
            "engine-bf16-cl": engine([*overrides, "trainer.precision=bf16-mixed"], Path(tmp) / "cl", True),
        }
        base = Straightforward(runs["engine-fp32"])
        cfg = runs["engine-fp32"].cfg
        x = load_images(args.images, cfg.data.micro_batch_size, cfg.data.image_size)
        print(f"cpu-small step: {cfg.model.preset}, batch {len(x)} at {cfg.data.image_size} px, "
              f"GAN {'on (G + D step)' if args.gan else 'off (G step, as in the recipe)'}; warm-up then "
              f"{args.reps} interleaved rounds")
        steps = {"straightforward": lambda: base.step(x)}
        for name, run in runs.items():
            steps[name] = lambda run=run: run.train_step([{"image": x}])
        for step in steps.values():
            step()
        wall, cpu = interleaved(steps, args.reps, log=False)
    stats, cpu_stats = summary(wall, "straightforward"), summary(cpu, "straightforward")
    print(f"{'variant':<16} {'wall s':>7} {'best':>7} {'x wall':>6} {'x best':>6} {'CPU s':>7} {'x CPU':>6}")
    for name in steps:
        s, c = stats[name], cpu_stats[name]
        print(f"{name:<16} {s['median_s']:>7.3f} {s['min_s']:>7.3f} {s['ratio_median']:>6.2f} {s['ratio_min']:>6.2f} "
              f"{c['median_s']:>7.3f} {c['ratio_median']:>6.2f}")
    print("x: speed-up over straightforward (median wall, best wall, median CPU time)")
    result = {"machine": machine(), "args": vars(args), "wall": stats, "cpu": cpu_stats}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
