"""The training engine, on Lightning Fabric.

Fabric rather than the Trainer: each step is a generator update followed by a discriminator update on the same
reconstructions, with gradient accumulation inside each phase, separate DDP wrappers for G and D, a step count of
generator updates, and exact resumption of the data stream; in Fabric these are a plain loop, in the Trainer they
are workarounds (manual optimisation, global_step counting both optimizers, mid-epoch restarts). Fabric still
provides devices, DDP across GPUs and nodes (torchrun and SLURM environments are detected), precision plugins and
the TensorBoard / CSV loggers.

One step with accumulation k = batch_size / (micro_batch_size * processes):
  1. G phase: k forward/backward passes of the generator loss (discriminator frozen), then the G optimizer step;
  2. D phase: k passes of the discriminator loss on the same (detached) reconstructions, then the D step;
  3. EMA update of the generator.
G and D phases are kept apart so that each optimizer's gradients are scaled by one loss scale under 16-mixed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ..data import ImageDataset, collate_skip_bad, eval_transform, find_images
from ..errors import InputError, WetokError
from .checkpoints import CHECKPOINT_DIR, LAST_POINTER, latest_checkpoint
from .config import TrainConfig
from .data import CropSpec, build_train_loader, list_files
from .ema import EMA
from .module import (
    TrainingLoss,
    build_discriminator,
    build_generator,
    load_training_checkpoint,
    set_stage_mode,
)
from .shards import build_shard_loader, expand_shards, is_shard_source

__all__ = ["train", "latest_checkpoint", "lr_factor"]

log = logging.getLogger("wetok.train")

CHECKPOINT_VERSION = 1
# Fault injection for the resume test: SIGKILL this process in the middle of the step after this one.
_KILL_ENV = "WETOK_TEST_KILL_AFTER_STEP"


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then constant / cosine / linear decay."""
    o, total = cfg.optim, cfg.trainer.max_steps
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Run:
    """State and helpers of one training process."""

    def __init__(self, cfg: TrainConfig, output: Path, resume: bool) -> None:
        from lightning.fabric import Fabric
        from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

        self.cfg, self.output = cfg, output
        t = cfg.trainer
        precision = {"32": "32-true"}.get(t.precision, t.precision)
        loggers = [
            TensorBoardLogger(root_dir=output / "logs", name="tensorboard"),
            CSVLogger(root_dir=output / "logs", name="csv", flush_logs_every_n_steps=1),
        ]
        self.fabric = Fabric(
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
            precision=precision, loggers=loggers,
        )
        self.fabric.launch()
        self.rank, self.world = self.fabric.global_rank, self.fabric.world_size
        d = cfg.data
        per_step = d.micro_batch_size * self.world
        if d.batch_size % per_step:
            raise InputError("config", f"data.batch_size {d.batch_size} is not a multiple of micro_batch_size "
                             f"{d.micro_batch_size} x {self.world} processes")
        self.accumulate = d.batch_size // per_step
        if t.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.resume_from = self._find_resume(resume)

    # ------------------------------------------------------------------------------------------------ set-up
    def _find_resume(self, resume: bool) -> Path | None:
        last = latest_checkpoint(self.output)
        if resume:
            if last is None:
                raise InputError(self.output, "--resume given but the folder holds no checkpoint")
            return last
        if last is not None:
            raise InputError(self.output, "already holds checkpoints; pass --resume or choose another --output")
        return None

    def build(self) -> None:
        cfg, fabric = self.cfg, self.fabric
        stage = cfg.trainer.stage
        torch.manual_seed(cfg.trainer.seed)  # same initialisation on every process
        ckpt = load_training_checkpoint(self.resume_from) if self.resume_from else None
        if ckpt is not None:
            from ..config import WeTokConfig
            from ..model import WeTok

            generator = WeTok(WeTokConfig.from_dict(ckpt["model_config"]))
        else:
            generator = build_generator(cfg)
        set_stage_mode(generator, stage)
        self.ema = fabric.to_device(EMA(generator, cfg.trainer.ema_decay, warmup=cfg.trainer.ema_warmup))
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
        self.step, self.position, self.bad_files = 0, 0, 0
        self.shard_state: dict[str, Tensor] | None = None
        if ckpt is not None:
            self._restore(ckpt)
        else:
            self.ema.copy_from(self.G.module)
        # per-process RNG for what the step draws (the generative decoder's noise); restored on resume
        if ckpt is None or "rng" not in ckpt:
            torch.manual_seed(cfg.trainer.seed * 7919 + 104729 * (self.rank + 1))

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.G.module.load_state_dict(ckpt["generator"])
        self.D.module.load_state_dict(ckpt["discriminator"])
        self.ema.load_state_dict(ckpt["ema"])
        self.loss.lecam.load_state_dict(ckpt["lecam"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.fabric.strategy.precision.load_state_dict(ckpt.get("precision", {}))
        self.step, self.position = int(ckpt["step"]), int(ckpt["data_position"])
        self.bad_files = int(ckpt.get("bad_files", 0))
        self.shard_state = ckpt.get("shard_state")
        changed = _config_changes(ckpt.get("config", {}), self.cfg.to_dict())
        if changed and self.rank == 0:
            log.warning("resuming with settings that differ from the checkpoint's: %s", "; ".join(changed))
        rng = ckpt.get("rng")
        if rng is not None and rng["cpu"].shape[0] == self.world:
            torch.set_rng_state(rng["cpu"][self.rank].clone())
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"][self.rank].clone())
        else:
            log.warning("process count changed since the checkpoint: random streams restart (data stream does not)")

    def train_files(self) -> tuple[str, list[str]]:
        """("files" or "shards", the list), fixed at the first start (``train_files.txt``) so resuming is exact."""
        source = self.cfg.data.train
        if source is None:
            raise InputError("config", "data.train is not set (pass data.train=FOLDER)")
        kind = "shards" if is_shard_source(source) else "files"
        listing = self.output / f"train_{kind}.txt"
        if self.rank == 0 and not listing.is_file():
            items = expand_shards(source) if kind == "shards" else list_files(source)
            _atomic_text(listing, "".join(f"{p}\n" for p in items))
        self.fabric.barrier()
        return kind, [line for line in listing.read_text().splitlines() if line]

    def train_loader(self) -> torch.utils.data.DataLoader:
        d, t = self.cfg.data, self.cfg.trainer
        spec = CropSpec(d.image_size, d.crop, d.hflip, d.min_side, d.max_aspect)
        self.data_kind, items = self.train_files()
        common = dict(micro_batch=d.micro_batch_size, seed=t.seed, rank=self.rank, world=self.world,
                      num_workers=d.num_workers)
        if self.data_kind == "files":
            return build_train_loader(items, spec, start=self.position, **common)
        workers = max(1, d.num_workers)
        self.cursors = torch.full((workers, 4), -1, dtype=torch.int64)  # valid, epoch, slot, sample per stream
        cursors, saved = {}, self.shard_state
        if saved is not None and tuple(saved["cursors"].shape[:2]) == (self.world, workers):
            for s, row in enumerate(saved["cursors"].reshape(-1, 4).tolist()):
                if row[0] == 1:
                    cursors[s] = (row[1], row[2], row[3])
            self.cursors = saved["cursors"][self.rank].clone()
        elif saved is not None:
            log.warning("processes x workers changed since the checkpoint: the shard stream restarts at a new epoch")
            next_epoch = int(saved["cursors"][..., 1].max()) + 1
            cursors = {s: (next_epoch, 0, -1) for s in range(self.world * workers)}
        rotation = (self.step * self.accumulate) % workers
        return build_shard_loader(items, spec, cursors=cursors, rotation=rotation, **common)

    def observe(self, batch: dict[str, Any]) -> None:
        """Remember where each shard stream stands (the last consumed sample of the batch)."""
        if self.data_kind == "shards":
            stream = int(batch["stream"][-1])
            row = [1, int(batch["epoch"][-1]), int(batch["slot"][-1]), int(batch["sample"][-1])]
            self.cursors[stream - self.rank * self.cursors.shape[0]] = torch.tensor(row)

    def val_loader(self) -> torch.utils.data.DataLoader | None:
        d = self.cfg.data
        if not d.val:
            return None
        files = find_images(d.val)[: d.val_max_images]
        dataset = ImageDataset(files[self.rank :: self.world], eval_transform(d.val_image_size or d.image_size))
        return torch.utils.data.DataLoader(dataset, batch_size=d.val_batch_size, collate_fn=collate_skip_bad,
                                           num_workers=min(2, d.num_workers))

    # --------------------------------------------------------------------------------------------- one step
    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Tensor]:
        fabric, cfg, k = self.fabric, self.cfg, self.accumulate
        G, D = self.G, self.D
        sync = self.world > 1
        logs: dict[str, Tensor] = {}

        def add(terms: dict[str, Tensor]) -> None:
            for name, value in terms.items():
                logs[name] = logs.get(name, 0.0) + value.float() / k

        factor = lr_factor(self.step, cfg)
        for opt, base in ((self.opt_g, cfg.optim.lr), (self.opt_d, cfg.optim.disc_lr or cfg.optim.lr)):
            for group in opt.param_groups:
                group["lr"] = base * factor
        gan = self.loss.gan_active(self.step)
        last_layer = G.module.decoder.conv_out.weight
        # G phase: the discriminator is frozen and called directly (outside its DDP wrapper)
        D.module.requires_grad_(False)
        images, recs = [], []
        for i, batch in enumerate(batches):
            x = batch["image"].to(fabric.device, non_blocking=True)
            with fabric.no_backward_sync(G, enabled=sync and i < k - 1):
                out = G(x)
                with fabric.autocast():
                    loss, terms = self.loss.generator_loss(x, out, D.module, self.step, last_layer)
                fabric.backward(loss / k)
            images.append(x)
            recs.append(out.reconstruction.detach())
            add(terms)
        self._optimizer_step(G, self.opt_g, logs, "g")
        D.module.requires_grad_(True)
        # D phase, on the same reconstructions
        if gan:
            for i, (x, rec) in enumerate(zip(images, recs, strict=True)):
                with fabric.no_backward_sync(D, enabled=sync and i < k - 1):
                    with fabric.autocast():
                        loss, terms = self.loss.discriminator_loss(x, rec, D)
                    fabric.backward(loss / k)
                add(terms)
            self._optimizer_step(D, self.opt_d, logs, "d")
        self.ema.update(G.module)
        logs["lr"] = torch.tensor(cfg.optim.lr * factor)
        return logs

    def _optimizer_step(self, module, optimizer, logs: dict[str, Tensor], name: str) -> None:
        clip = self.cfg.optim.grad_clip
        if clip is not None:
            norm = self.fabric.clip_gradients(module, optimizer, max_norm=clip, error_if_nonfinite=False)
            logs[f"{name}_grad_norm"] = norm.detach().float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------- validation and images
    @torch.no_grad()
    def validate(self, loader) -> dict[str, float]:
        """L1 and PSNR (dB, images in [0, 1] after clamping) of the EMA model on the validation images."""
        model = self.ema.module
        device = self.fabric.device
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # l1, psnr, count
        for b, batch in enumerate(loader):
            if batch["image"] is None:
                continue
            x = batch["image"].to(device)
            gen = torch.Generator(device).manual_seed(self.cfg.trainer.seed + b * self.world + self.rank)
            with self.fabric.autocast():
                rec = model.reconstruct(x, generator=gen)
            rec = rec.float().clamp(-1, 1)
            l1 = (x - rec).abs().flatten(1).mean(1)
            mse = ((x - rec) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            sums += torch.stack([l1.sum(), (-10 * torch.log10(mse)).sum(), torch.tensor(len(x), device=device)])
        sums = self.fabric.all_reduce(sums, reduce_op="sum")
        n = max(sums[2].item(), 1.0)
        return {"val/l1": sums[0].item() / n, "val/psnr": sums[1].item() / n}

    @torch.no_grad()
    def save_images(self, images: Tensor) -> None:
        """PNG grid: the images (top row) and the EMA model's reconstructions (bottom row)."""
        from torchvision.utils import save_image

        if self.rank != 0:
            return
        x = images[:8].to(self.fabric.device)
        gen = torch.Generator(self.fabric.device).manual_seed(self.cfg.trainer.seed)
        rec = self.ema.module.reconstruct(x, generator=gen).float().clamp(-1, 1)
        folder = self.output / "images"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{self.step:08d}.png"
        tmp = folder / f".{path.name}.tmp.png"
        save_image(torch.cat([x, rec]) * 0.5 + 0.5, tmp, nrow=len(x), padding=2)
        os.replace(tmp, path)

    # -------------------------------------------------------------------------------------------- checkpoints
    def _gather_rng(self) -> dict[str, Tensor]:
        device = self.fabric.device
        out = {"cpu": self.fabric.all_gather(torch.get_rng_state().to(device)).reshape(self.world, -1).cpu()}
        if device.type == "cuda":
            state = torch.cuda.get_rng_state().to(device)
            out["cuda"] = self.fabric.all_gather(state).reshape(self.world, -1).cpu()
        return out

    def save_checkpoint(self) -> None:
        rng = self._gather_rng()
        shard_state = None
        if self.data_kind == "shards":
            gathered = self.fabric.all_gather(self.cursors.to(self.fabric.device)).cpu()
            shard_state = {"cursors": gathered.reshape(self.world, *self.cursors.shape)}
        if self.rank == 0:
            state = {
                "version": CHECKPOINT_VERSION,
                "step": self.step,
                "data_position": self.position,
                "bad_files": self.bad_files,
                "world_size": self.world,
                "config": self.cfg.to_dict(),
                "model_config": self.G.module.config.to_dict(),
                "generator": self.G.module.state_dict(),
                "discriminator": self.D.module.state_dict(),
                "ema": self.ema.state_dict(),
                "lecam": self.loss.lecam.state_dict(),
                "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(),
                "precision": self.fabric.strategy.precision.state_dict(),
                "rng": rng,
                "shard_state": shard_state,
            }
            folder = self.output / CHECKPOINT_DIR
            folder.mkdir(exist_ok=True)
            name = f"step-{self.step:08d}.pt"
            _atomic_torch_save(state, folder / name)
            _atomic_text(folder / LAST_POINTER, name + "\n")
            keep = self.cfg.trainer.keep_checkpoints
            if keep > 0:
                for old in sorted(folder.glob("step-*.pt"))[:-keep]:
                    old.unlink(missing_ok=True)
        self.fabric.barrier()

    # ------------------------------------------------------------------------------------------------- loop
    def run(self) -> Path | None:
        cfg, fabric, t = self.cfg, self.fabric, self.cfg.trainer
        d = cfg.data
        loader = self.train_loader()
        val_loader = self.val_loader()
        preview = next(iter(val_loader))["image"] if val_loader is not None and self.rank == 0 else None
        if self.rank == 0:
            _atomic_text(self.output / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        kill_after = int(os.environ.get(_KILL_ENV, "-1"))
        bar = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc=f"stage {t.stage}", dynamic_ncols=True)
        if val_loader is not None and t.val_every and self.step == 0:
            fabric.log_dict(self.validate(val_loader), step=0)  # the baseline of the run
        window: list[dict[str, Tensor]] = []
        tic = time.perf_counter()
        batches_iter = iter(loader)
        deadline = time.monotonic() + 60 * t.max_minutes if t.max_minutes else None
        while self.step < t.max_steps:
            batches = [next(batches_iter) for _ in range(self.accumulate)]
            if kill_after >= 0 and self.step == kill_after + 1:
                os.environ[_KILL_ENV] = "-1"
                self.train_step(batches[:1] * self.accumulate)  # half-done work that must not leak
                os.kill(os.getpid(), 9)
            logs = self.train_step(batches)
            for batch in batches:
                self.observe(batch)
            self.step += 1
            self.position += d.batch_size
            self.bad_files += sum(b["skipped"] for b in batches)
            window.append(logs)
            if t.log_every and self.step % t.log_every == 0:
                metrics = self._reduce_window(window, time.perf_counter() - tic)
                window, tic = [], time.perf_counter()
                fabric.log_dict(metrics, step=self.step)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in _BAR_KEYS})
            if val_loader is not None and t.val_every and self.step % t.val_every == 0:
                fabric.log_dict(self.validate(val_loader), step=self.step)
            if t.image_every and self.step % t.image_every == 0:
                self.save_images(preview if preview is not None else batches[0]["image"])
            time_up = deadline is not None and bool(fabric.broadcast(time.monotonic() > deadline, src=0))
            if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == t.max_steps or time_up:
                self.save_checkpoint()
            if bar is not None:
                bar.update(1)
            if time_up:
                log.warning("trainer.max_minutes reached at step %d", self.step)
                break
        if bar is not None:
            bar.close()
        if val_loader is not None and not (t.val_every and self.step % t.val_every == 0):
            fabric.log_dict(self.validate(val_loader), step=self.step)
        for logger in fabric.loggers:
            logger.finalize("success")
        return latest_checkpoint(self.output) if self.rank == 0 else None

    def _reduce_window(self, window: list[dict[str, Tensor]], seconds: float) -> dict[str, float]:
        names = sorted({k for w in window for k in w})
        values = torch.stack([
            torch.stack([torch.as_tensor(w[k], dtype=torch.float32).cpu() for w in window if k in w]).mean()
            for k in names
        ]).to(self.fabric.device)
        values = self.fabric.all_reduce(values, reduce_op="mean").cpu().tolist()
        metrics = {f"train/{k}": v for k, v in zip(names, values, strict=True)}
        metrics["train/steps_per_second"] = len(window) / max(seconds, 1e-9)
        metrics["train/bad_files"] = float(self.bad_files)
        return metrics


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key: old -> new`` for every recipe setting that differs."""
    out = []
    for section, values in new.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key, value)
            if before != value:
                out.append(f"{section}.{key}: {before!r} -> {value!r}")
    return out


_BAR_KEYS = {f"train/{k}" for k in ("l1", "lpips", "g_loss", "d_total", "codebook_entropy", "token_entropy")}


def train(cfg: TrainConfig, output: str | Path, *, resume: bool = False) -> Path | None:
    """Train (stage ``cfg.trainer.stage``) into ``output``; returns the last checkpoint's path.

    ``output`` receives ``config.yaml``, ``train_files.txt``, ``checkpoints/step-*.pt`` (full state) with a
    ``checkpoints/last`` pointer, ``images/step-*.png`` grids and ``logs/{tensorboard,csv}``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    try:
        run = _Run(cfg, output, resume)
        run.build()
        return run.run()
    except WetokError:
        raise
    except FileNotFoundError as err:
        raise InputError(err.filename or output, err.strerror or "not found") from err
