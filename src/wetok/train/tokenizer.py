"""The tokenizer task: WeTok stage 1 / stage 2 with its discriminator, on image folders, file lists or tar shards.

One step with accumulation k = batch_size / (micro_batch_size * processes):
  1. G phase: k forward/backward passes of the generator loss (discriminator frozen), then the G optimizer step;
  2. D phase: k passes of the discriminator loss on the same (detached) reconstructions, then the D step;
  3. (the engine) EMA update of the generator.
G and D phases are kept apart so that each optimizer's gradients are scaled by one loss scale under 16-mixed, and
G and D have separate DDP wrappers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ..data import ImageDataset, collate_skip_bad, eval_transform, find_images
from ..errors import InputError
from .data import CropSpec, build_train_loader, list_files
from .module import TrainingLoss, build_discriminator, build_generator, set_stage_mode
from .shards import build_shard_loader, expand_shards, is_shard_source
from .task import Task

__all__ = ["TokenizerTask"]

log = logging.getLogger("wetok.train")


class TokenizerTask(Task):
    """WeTok (the "generator" of the GAN) plus PatchGAN discriminator and LeCam state; see the module docstring."""

    name = "tokenizer"
    progress_keys = ("l1", "lpips", "g_loss", "d_total", "codebook_entropy", "token_entropy")

    @property
    def description(self) -> str:
        return f"stage {self.cfg.trainer.stage}"

    # ------------------------------------------------------------------------------------------------ models
    def build(self, ckpt: dict[str, Any] | None) -> nn.Module:
        cfg, fabric = self.cfg, self.fabric
        if ckpt is not None:
            from ..config import WeTokConfig
            from ..model import WeTok

            generator = WeTok(WeTokConfig.from_dict(ckpt["model_config"]))
        else:
            generator = build_generator(cfg)
        set_stage_mode(generator, cfg.trainer.stage)
        torch.manual_seed(cfg.trainer.seed + 1)  # the same D (and random LPIPS backbone) on a fresh start or resume
        discriminator = build_discriminator(cfg)
        if cfg.discriminator.norm == "sync_batch" and fabric.device.type == "cuda":
            discriminator.convert_sync_batchnorm()
        self.loss = fabric.to_device(TrainingLoss(cfg))
        o = cfg.optim
        g_params = [p for p in generator.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(g_params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=o.disc_lr or o.lr, betas=tuple(o.betas),
                                 weight_decay=o.weight_decay)
        self.G, self.opt_g = fabric.setup(generator, opt_g)
        self.D, self.opt_d = fabric.setup(discriminator, opt_d)
        self.shard_state: dict[str, Tensor] | None = None
        return self.G.module

    def optimizers(self) -> list[tuple[Optimizer, float]]:
        o = self.cfg.optim
        return [(self.opt_g, o.lr), (self.opt_d, o.disc_lr or o.lr)]

    def state(self) -> dict[str, Any]:
        shard_state = None
        if self.data_kind == "shards":
            gathered = self.fabric.all_gather(self.cursors.to(self.fabric.device)).cpu()
            shard_state = {"cursors": gathered.reshape(self.run.world, *self.cursors.shape)}
        return {
            "model_config": self.G.module.config.to_dict(),
            "generator": self.G.module.state_dict(),
            "discriminator": self.D.module.state_dict(),
            "lecam": self.loss.lecam.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "shard_state": shard_state,
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        self.G.module.load_state_dict(ckpt["generator"])
        self.D.module.load_state_dict(ckpt["discriminator"])
        self.loss.lecam.load_state_dict(ckpt["lecam"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.shard_state = ckpt.get("shard_state")

    # -------------------------------------------------------------------------------------------------- data
    def train_files(self) -> tuple[str, list[str]]:
        """("files" or "shards", the list), fixed at the first start (``train_files.txt``) so resuming is exact."""
        source = self.cfg.data.train
        if source is None:
            raise InputError("config", "data.train is not set (pass data.train=FOLDER)")
        kind = "shards" if is_shard_source(source) else "files"
        items = self.run.fixed_listing(f"train_{kind}.txt",
                                       lambda: expand_shards(source) if kind == "shards" else list_files(source))
        return kind, items

    def train_loader(self) -> DataLoader:
        run, d, t = self.run, self.cfg.data, self.cfg.trainer
        spec = CropSpec(d.image_size, d.crop, d.hflip, d.min_side, d.max_aspect, d.resize_size)
        self.data_kind, items = self.train_files()
        common = dict(micro_batch=d.micro_batch_size, seed=t.seed, rank=run.rank, world=run.world,
                      num_workers=d.num_workers)
        if self.data_kind == "files":
            return build_train_loader(items, spec, start=run.position, **common)
        workers = max(1, d.num_workers)
        self.cursors = torch.full((workers, 4), -1, dtype=torch.int64)  # valid, epoch, slot, sample per stream
        cursors, saved = {}, self.shard_state
        if saved is not None and tuple(saved["cursors"].shape[:2]) == (run.world, workers):
            for s, row in enumerate(saved["cursors"].reshape(-1, 4).tolist()):
                if row[0] == 1:
                    cursors[s] = (row[1], row[2], row[3])
            self.cursors = saved["cursors"][run.rank].clone()
        elif saved is not None:
            log.warning("processes x workers changed since the checkpoint: the shard stream restarts at a new epoch")
            next_epoch = int(saved["cursors"][..., 1].max()) + 1
            cursors = {s: (next_epoch, 0, -1) for s in range(run.world * workers)}
        rotation = (run.step * run.accumulate) % workers
        return build_shard_loader(items, spec, cursors=cursors, rotation=rotation, **common)

    def observe(self, batches: list[dict[str, Any]]) -> None:
        """Remember where each shard stream stands (the last consumed sample of each batch)."""
        if self.data_kind != "shards":
            return
        for batch in batches:
            stream = int(batch["stream"][-1])
            row = [1, int(batch["epoch"][-1]), int(batch["slot"][-1]), int(batch["sample"][-1])]
            self.cursors[stream - self.run.rank * self.cursors.shape[0]] = torch.tensor(row)

    def val_loader(self) -> DataLoader | None:
        d, run = self.cfg.data, self.run
        if not d.val:
            return None
        files = find_images(d.val)[: d.val_max_images]
        dataset = ImageDataset(files[run.rank :: run.world], eval_transform(d.val_image_size or d.image_size))
        # its own generator: each iter() draws a worker base seed, which must not come from the global RNG
        return DataLoader(dataset, batch_size=d.val_batch_size, collate_fn=collate_skip_bad,
                          num_workers=min(2, d.num_workers),
                          generator=torch.Generator().manual_seed(self.cfg.trainer.seed))

    # --------------------------------------------------------------------------------------------- one step
    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Tensor]:
        fabric, run, k = self.fabric, self.run, self.run.accumulate
        G, D = self.G, self.D
        sync = run.world > 1
        logs: dict[str, Tensor] = {}

        def add(terms: dict[str, Tensor]) -> None:
            for name, value in terms.items():
                logs[name] = logs.get(name, 0.0) + value.float() / k

        gan = self.loss.gan_active(run.step)
        last_layer = G.module.decoder.conv_out.weight
        # G phase: the discriminator is frozen and called directly (outside its DDP wrapper)
        D.module.requires_grad_(False)
        images, recs = [], []
        for i, batch in enumerate(batches):
            x = batch["image"].to(fabric.device, non_blocking=True)
            with fabric.no_backward_sync(G, enabled=sync and i < k - 1):
                out = G(x)
                with fabric.autocast():
                    loss, terms = self.loss.generator_loss(x, out, D.module, run.step, last_layer)
                fabric.backward(loss / k)
            images.append(x)
            recs.append(out.reconstruction.detach())
            add(terms)
        run.optimizer_step(G, self.opt_g, logs, "g_grad_norm")
        D.module.requires_grad_(True)
        # D phase, on the same reconstructions
        if gan:
            for i, (x, rec) in enumerate(zip(images, recs, strict=True)):
                with fabric.no_backward_sync(D, enabled=sync and i < k - 1):
                    with fabric.autocast():
                        loss, terms = self.loss.discriminator_loss(x, rec, D)
                    fabric.backward(loss / k)
                add(terms)
            run.optimizer_step(D, self.opt_d, logs, "d_grad_norm")
        return logs

    # ------------------------------------------------------------------------------- validation and images
    @torch.no_grad()
    def validate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """L1 and PSNR (dB, images in [0, 1] after clamping) of ``model`` on the validation images."""
        device, run = self.fabric.device, self.run
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # l1, psnr, count
        for b, batch in enumerate(loader):
            if batch["image"] is None:
                continue
            x = batch["image"].to(device)
            gen = torch.Generator(device).manual_seed(self.cfg.trainer.seed + b * run.world + run.rank)
            with self.fabric.autocast():
                rec = model.reconstruct(x, generator=gen)
            rec = rec.float().clamp(-1, 1)
            l1 = (x - rec).abs().flatten(1).mean(1)
            mse = ((x - rec) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            sums += torch.stack([l1.sum(), (-10 * torch.log10(mse)).sum(), torch.tensor(len(x), device=device)])
        sums = self.fabric.all_reduce(sums, reduce_op="sum")
        n = max(sums[2].item(), 1.0)
        return {"val/l1": sums[0].item() / n, "val/psnr": sums[1].item() / n}

    def preview(self, loader: DataLoader | None) -> Tensor | None:
        return next(iter(loader))["image"] if loader is not None else None

    @torch.no_grad()
    def save_images(self, model: nn.Module, preview: Tensor | None, batches: list[dict[str, Any]],
                    path: Path) -> None:
        """PNG grid: the images (top row: the validation preview, else this step's batch) and ``model``'s
        reconstructions (bottom row)."""
        from torchvision.utils import save_image

        from .._files import atomic_write

        images = preview if preview is not None else batches[0]["image"]
        x = images[:8].to(self.fabric.device)
        gen = torch.Generator(self.fabric.device).manual_seed(self.cfg.trainer.seed)
        rec = model.reconstruct(x, generator=gen).float().clamp(-1, 1)
        grid = torch.cat([x, rec]) * 0.5 + 0.5
        atomic_write(path, lambda tmp: save_image(grid, tmp, nrow=len(x), padding=2), suffix=".png")
