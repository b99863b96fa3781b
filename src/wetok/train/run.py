"""The training engine, on Lightning Fabric, shared by every task (:mod:`wetok.train.task`).

Fabric rather than the Trainer: a tokenizer step is a generator update followed by a discriminator update on the
same reconstructions, with gradient accumulation inside each phase, separate DDP wrappers for G and D, a step
count of generator updates, and exact resumption of the data stream; in Fabric these are a plain loop, in the
Trainer they are workarounds (manual optimisation, global_step counting both optimizers, mid-epoch restarts).
Fabric still provides devices, DDP across GPUs and nodes (torchrun and SLURM environments are detected), precision
plugins and the TensorBoard / CSV loggers.

The loop: gather ``accumulate`` micro-batches, set the learning rate of the step, let the task take one step,
update the EMA, then log, validate, draw and checkpoint when due. Everything outside the steps (validation, image
grids, previews) runs with the global RNG saved and restored, and no DataLoader iterator draws from it, so the RNG
states in a checkpoint are exactly those an uninterrupted run has at that step.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .._distributed import close_group, group_initialized
from .._files import atomic_write
from ..errors import InputError, WetokError
from .checkpoints import CHECKPOINT_DIR, LAST_POINTER, latest_checkpoint, load_training_checkpoint
from .config import TrainConfig
from .ema import EMA
from .shards import expand_shards, is_shard_source
from .task import Task

__all__ = ["train", "latest_checkpoint", "lr_factor"]

log = logging.getLogger("wetok.train")

CHECKPOINT_VERSION = 1
# What the progress bar shows of every task
_BAR_COMMON = ("loss", "lr")
# Fault injection for the resume test: SIGKILL this process in the middle of the step after this one.
_KILL_ENV = "WETOK_TEST_KILL_AFTER_STEP"


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up ``s + (1 - s) (step + 1) / warmup_steps``
    (s = ``warmup_start``), ``hold_steps`` at 1, then constant / cosine / linear decay to ``min_lr_ratio`` at
    ``max_steps``."""
    o, total = cfg.optim, cfg.trainer.max_steps
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return o.warmup_start + (1.0 - o.warmup_start) * (step + 1) / o.warmup_steps
    start = o.warmup_steps + o.hold_steps
    if o.schedule == "constant" or step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, total - start))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def _rng_untouched(device: torch.device) -> Iterator[None]:
    """Run work that is not part of a training step (validation, previews, sample grids) without moving the
    global RNG streams that the steps draw from, so a resumed run draws exactly what an uninterrupted one does."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode, each submodule's own mode restored afterwards (stage 2 mixes modes)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _keeps_rng(method: Callable[..., Any]) -> Callable[..., Any]:
    """Method decorator: :func:`_rng_untouched` around a method of :class:`_Run`."""

    @functools.wraps(method)
    def wrapper(self: _Run, *args: Any, **kwargs: Any) -> Any:
        with _rng_untouched(self.fabric.device):
            return method(self, *args, **kwargs)

    return wrapper


class _Run:
    """State and helpers of one training process: the engine around a :class:`Task`."""

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
        try:
            self.fabric = Fabric(
                accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                precision=precision, loggers=loggers,
            )
        except Exception as err:  # Lightning's MisconfigurationException, ValueError, RuntimeError, ...
            lines = str(err).strip().splitlines()
            raise InputError("config", "trainer.accelerator / devices / strategy / num_nodes / precision are not "
                             f"usable here: {lines[0][:300] if lines else type(err).__name__}") from err
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
        self.task = make_task(self)

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
        t = self.cfg.trainer
        ckpt = load_training_checkpoint(self.resume_from) if self.resume_from else None
        if ckpt is not None and ckpt.get("task", "tokenizer") != t.task:
            raise InputError(self.resume_from, f"is a {ckpt.get('task', 'tokenizer')} checkpoint; the recipe "
                             f"trains a {t.task} (trainer.task)")
        torch.manual_seed(t.seed)  # same initialisation on every process
        try:
            model = self.task.build(ckpt)
            self.ema = (self.fabric.to_device(EMA(model, t.ema_decay, warmup=t.ema_warmup)) if t.ema else None)
            self.model = model
            self.step, self.position, self.bad_files = 0, 0, 0
            if ckpt is not None:
                self._restore(ckpt)
            elif self.ema is not None:
                self.ema.copy_from(model)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
            if ckpt is None:
                raise
            lines = str(err).strip().splitlines()
            reason = f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
            raise InputError(self.resume_from, f"cannot resume from this checkpoint ({reason})") from err
        # per-process RNG for what the steps draw (dropout, the generative decoder's noise); restored on resume
        if ckpt is None or "rng" not in ckpt:
            torch.manual_seed(t.seed * 7919 + 104729 * (self.rank + 1))

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.task.load_state(ckpt)
        if self.ema is not None:
            if ckpt.get("ema") is None:
                log.warning("the checkpoint has no EMA; it restarts from the current weights")
                self.ema.copy_from(self.model)
            else:
                self.ema.load_state_dict(ckpt["ema"])
        self.fabric.strategy.precision.load_state_dict(ckpt.get("precision", {}))
        self.step, self.position = int(ckpt["step"]), int(ckpt["data_position"])
        self.bad_files = int(ckpt.get("bad_files", 0))
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

    def fixed_listing(self, name: str, make: Callable[[], list[Any]]) -> list[str]:
        """A list of strings fixed at the first start of the run (``OUTPUT/name``, written by rank 0 from
        ``make()``), so that a resumed run reads exactly the same data whatever changed on disk."""
        listing = self.output / name
        if self.rank == 0 and not listing.is_file():
            _atomic_text(listing, "".join(f"{p}\n" for p in make()))
        self.fabric.barrier()
        return [line for line in listing.read_text().splitlines() if line]

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation, image grids and export use: the EMA model, or the live model without EMA."""
        return self.ema.module if self.ema is not None else self.model

    # --------------------------------------------------------------------------------------------- one step
    def set_learning_rates(self) -> float:
        factor = lr_factor(self.step, self.cfg)
        for opt, base in self.task.optimizers():
            for group in opt.param_groups:
                group["lr"] = base * factor
        return factor

    def optimizer_step(self, module, optimizer, logs: dict[str, Tensor], norm_name: str) -> None:
        """Clip (``optim.grad_clip``, logging the norm as ``norm_name``), step and clear one optimizer."""
        clip = self.cfg.optim.grad_clip
        if clip is not None:
            norm = self.fabric.clip_gradients(module, optimizer, max_norm=clip, error_if_nonfinite=False)
            logs[norm_name] = norm.detach().float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Tensor]:
        factor = self.set_learning_rates()
        logs = self.task.train_step(batches)
        if self.ema is not None:
            self.ema.update(self.model)
        logs["lr"] = torch.tensor(self.cfg.optim.lr * factor)
        return logs

    # ------------------------------------------------------------------------------- validation and images
    @_keeps_rng
    def validate(self, loader) -> dict[str, float]:
        with torch.no_grad(), _eval_mode(self.eval_model) as model:
            return self.task.validate(model, loader)

    @_keeps_rng
    def save_images(self, preview: Any, batches: list[dict[str, Any]]) -> None:
        if self.rank != 0:
            return
        with torch.no_grad(), _eval_mode(self.eval_model) as model:
            self.task.save_images(model, preview, batches, self.output / "images" / f"step-{self.step:08d}.png")

    @_keeps_rng
    def preview(self, loader) -> Any:
        return self.task.preview(loader) if self.rank == 0 else None

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
        task_state = self.task.state()
        if self.rank == 0:
            state = {
                "version": CHECKPOINT_VERSION,
                "task": self.task.name,
                "step": self.step,
                "data_position": self.position,
                "bad_files": self.bad_files,
                "world_size": self.world,
                "config": self.cfg.to_dict(),
                **task_state,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "precision": self.fabric.strategy.precision.state_dict(),
                "rng": rng,
            }
            folder = self.output / CHECKPOINT_DIR
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
        loader = self.task.train_loader()
        val_loader = self.task.val_loader()
        preview = self.preview(val_loader)
        if self.rank == 0:
            _atomic_text(self.output / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        kill_after = int(os.environ.get(_KILL_ENV, "-1"))
        bar = None
        if self.rank == 0 and t.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc=self.task.description, dynamic_ncols=True)
        if val_loader is not None and t.val_every and self.step == 0:
            fabric.log_dict(self.validate(val_loader), step=0)  # the baseline of the run
        bar_keys = {f"train/{k}" for k in (*_BAR_COMMON, *self.task.progress_keys)}
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
            self.task.observe(batches)
            self.step += 1
            self.position += cfg.data.batch_size
            self.bad_files += sum(int(b.get("skipped", 0)) for b in batches)
            window.append(logs)
            if t.log_every and self.step % t.log_every == 0:
                metrics = self._reduce_window(window, time.perf_counter() - tic)
                window, tic = [], time.perf_counter()
                fabric.log_dict(metrics, step=self.step)
                if bar is not None:
                    bar.set_postfix({k.removeprefix("train/"): f"{v:.4g}" for k, v in metrics.items()
                                     if k in bar_keys})
            if val_loader is not None and t.val_every and self.step % t.val_every == 0:
                fabric.log_dict(self.validate(val_loader), step=self.step)
            if t.image_every and self.step % t.image_every == 0:
                self.save_images(preview, batches)
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


def make_task(run: _Run) -> Task:
    """The :class:`Task` named by ``trainer.task``."""
    if run.cfg.trainer.task == "generator":
        from .generator import GeneratorTask

        return GeneratorTask(run)
    from .tokenizer import TokenizerTask

    return TokenizerTask(run)


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``section.key: old -> new`` for every recipe setting that differs."""
    out = []
    for section, values in new.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key, value)
            if before != value:
                out.append(f"{section}.{key}: {before!r} -> {value!r}")
    return out


def train(cfg: TrainConfig, output: str | Path, *, resume: bool = False) -> Path | None:
    """Train ``cfg.trainer.task`` (a tokenizer stage ``cfg.trainer.stage``, or a generator) into ``output``;
    returns the last checkpoint's path.

    ``output`` receives ``config.yaml``, the data listing fixed at the first start (``train_files.txt``,
    ``train_shards.txt`` or ``train_tokens.txt``), ``checkpoints/step-*.pt`` (full state) with a
    ``checkpoints/last`` pointer, ``images/step-*.png`` grids and ``logs/{tensorboard,csv}``. Data and init
    paths are checked before anything is created; a run folder this call created is removed again when the run
    fails (:class:`wetok.errors.WetokError`) before its first checkpoint. A process group this call creates (Fabric
    under torchrun) is destroyed before it returns; one the caller created is left to the caller.
    """
    output = Path(output)
    check_paths(cfg, output, resume)
    created = not output.exists()  # the folder appears with the run's first file (the data listing)
    owns_group = not group_initialized()  # a process group this call creates (Fabric under torchrun) it destroys
    finished = False
    try:
        run = _Run(cfg, output, resume)
        run.build()
        last = run.run()
        finished = True
        return last
    except WetokError:
        _remove_if_empty_run(output, created)
        raise
    except FileNotFoundError as err:
        _remove_if_empty_run(output, created)
        raise InputError(err.filename or output, err.strerror or "not found") from err
    finally:
        if owns_group and group_initialized():
            close_group(wait=finished)


def check_paths(cfg: TrainConfig, output: Path, resume: bool) -> None:
    """Refuse, before anything is created, a run whose data or init paths do not exist or whose output cannot be
    a run folder."""
    d, m = cfg.data, cfg.model
    if output.exists() and not output.is_dir():
        raise InputError(output, "exists and is not a folder")
    if resume and latest_checkpoint(output) is None:
        raise InputError(output, "--resume given but the folder holds no checkpoint")
    what = "a token-shard folder made by `wetok tokenize`" if cfg.task == "generator" else "an image folder"
    if not d.train:
        raise InputError("config", f"data.train is not set (pass data.train=PATH: {what})")
    for key, path in (("data.train", d.train), ("data.val", d.val), ("model.init", m.init)):
        if not path:
            continue
        if cfg.task == "tokenizer" and key != "model.init" and is_shard_source(path):
            expand_shards(path)  # one InputError for a missing shard
        elif not Path(path).exists():
            raise InputError(path, f"{key}: no such file or folder")
        elif cfg.task == "generator" and key != "model.init" and not Path(path).is_dir():
            raise InputError(path, f"{key}: not a folder ({what})")


def _remove_if_empty_run(output: Path, created: bool) -> None:
    """Remove the run folder this call created when the run failed before its first checkpoint: no partial
    output is left behind."""
    if created and output.is_dir() and latest_checkpoint(output) is None:
        shutil.rmtree(output, ignore_errors=True)
