"""What the training engine trains: the interface between :mod:`wetok.train.run` and a model family.

The engine owns everything a run has whatever is trained: processes, devices and precision (Fabric), the
accumulation count, the step counter and data position, the learning-rate schedule, the EMA of the model, RNG
states, full-state checkpoints and resumption, logs, progress, and when validation, image grids and checkpoints
happen. A :class:`Task` owns the rest: its models and optimizers, its data, one optimisation step, validation and
the picture it draws. Two tasks exist: :class:`wetok.train.tokenizer.TokenizerTask` (WeTok, stages 1 and 2) and
:class:`wetok.train.generator.GeneratorTask` (WeTok-AR on token shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from .run import _Run

__all__ = ["Task"]


class Task:
    """Base class of a training task; ``run`` is the engine (its ``cfg``, ``fabric``, ``rank``, ``world``,
    ``accumulate``, ``step``, ``position`` and helpers :meth:`_Run.optimizer_step`)."""

    #: the ``trainer.task`` value
    name: ClassVar[str]
    #: logged terms (without ``train/``) shown on the progress bar
    progress_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.cfg = run.cfg
        self.fabric = run.fabric

    @property
    def description(self) -> str:
        """The progress bar's label."""
        return self.name

    def build(self, ckpt: dict[str, Any] | None) -> nn.Module:
        """Create the models and optimizers (set up through ``self.fabric``), from ``ckpt``'s architecture when
        resuming. Called with the global RNG seeded by ``trainer.seed`` on every process (identical
        initialisation everywhere). Returns the unwrapped model whose EMA the engine keeps (and exports)."""
        raise NotImplementedError

    def optimizers(self) -> list[tuple[Optimizer, float]]:
        """Each optimizer with its base learning rate (the engine multiplies it by the schedule's factor)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The task's checkpoint entries (``model_config`` among them). Called on every process (it may
        gather); only rank 0's result is written."""
        raise NotImplementedError

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`state` saved."""
        raise NotImplementedError

    def train_loader(self) -> DataLoader:
        """This process's endless training stream, starting where ``run.position`` / the checkpoint says."""
        raise NotImplementedError

    def observe(self, batches: list[dict[str, Any]]) -> None:
        """Note what a finished step consumed (for streams whose position is more than a count)."""

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Tensor]:
        """One optimisation step on ``run.accumulate`` micro-batches; returns the terms to log."""
        raise NotImplementedError

    def val_loader(self) -> DataLoader | None:
        """This process's share of the validation data, or None. Its iterators must not draw from the global RNG
        (give the DataLoader its own generator)."""
        return None

    def validate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation figures of ``model`` (the EMA model, or the live one without EMA; in eval mode and without
        gradients), reduced over processes."""
        return {}

    def preview(self, loader: DataLoader | None) -> Any:
        """What every image grid of the run shows (rank 0; e.g. a fixed validation batch), or None."""
        return None

    def save_images(self, model: nn.Module, preview: Any, batches: list[dict[str, Any]], path: Path) -> None:
        """Write the image grid of this step to ``path`` (rank 0, ``model`` as in :meth:`validate`, under an
        untouched global RNG)."""
