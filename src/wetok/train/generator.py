"""The generator task: WeTok-AR trained on pre-tokenized shards (``wetok tokenize``), spec §7.3.

One step: ``accumulate`` micro-batches of (token map, label), each a forward/backward pass of the official loss
(the sum over sub-tokens of the mean cross-entropy; class dropout and the token / residual / FFN dropouts act
inside the model in training mode), then one AdamW step with the gradient norm clipped. Samples come from the
token data set as a seeded stream of positions (:class:`wetok.train.data.StreamBatchSampler`): sample p is a
function of (seed, p) only, so N processes see what one process with the same global batch sees, and a resumed
run continues at the saved position.

The model's token grid, groups, bits and class count come from the shards (a preset's values are replaced; an
explicit ``model.overrides`` value that disagrees is an error). Validation is the loss on ``data.val`` shards;
image grids are samples decoded by the tokenizer when it is known (``model.tokenizer``, or the tokenizer named in
the shards when that is a local folder or checkpoint), else pictures of the token maps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError, WetokError
from .data import StreamBatchSampler
from .task import Task

__all__ = ["GeneratorTask", "ar_model_from_checkpoint", "generator_from_checkpoint", "load_tokenizer",
           "param_groups"]

log = logging.getLogger("wetok.train")

#: fields of WeTokARConfig that the token data set decides
DATA_FIELDS = ("grid_height", "grid_width", "groups", "bits_per_group", "num_classes")


def param_groups(model: nn.Module, weight_decay: float, *, decay_all: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on the trainable tensors with >= 2 dimensions (weight matrices,
    embedding tables), none on the others (norm weights, biases); ``decay_all`` decays every tensor (what the
    official code does in effect, spec §7.3). Empty groups are left out."""
    decay, other = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if decay_all or param.dim() >= 2 else other).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class _Samples(Dataset):
    """(indices, label) pairs as dicts; addressed by an index, or by the (index, stream position) keys of
    StreamBatchSampler."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, position = key if isinstance(key, tuple) else (key, None)
        indices, label = self.data[index]
        item = {"indices": indices, "label": label}
        if position is not None:
            item["position"] = position
        return item


def collate_tokens(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack token maps (B, h, w, g) and labels (B,) (and stream positions, when present)."""
    out = {"indices": torch.stack([it["indices"] for it in items]),
           "labels": torch.stack([torch.as_tensor(it["label"]) for it in items])}
    if "position" in items[0]:
        out["position"] = torch.tensor([it["position"] for it in items])
    return out


def open_tokens(path: str | None, views: list[str] | None, what: str) -> Any:
    """The :class:`wetok.token_shards.TokenDataset` of ``data.train`` / ``data.val``."""
    from ..token_shards import TokenDataset

    if path is None:
        raise InputError("config", f"{what} is not set (a token-shard folder made by `wetok tokenize`)")
    data = TokenDataset(path, views=views)
    if len(data) == 0:
        raise InputError(path, "the token data set holds no samples")
    return data


def model_config_for(cfg: Any, data: Any) -> Any:
    """The recipe's WeTokARConfig with the token data set's grid, groups, bits and class count."""
    wanted = {"grid_height": data.grid[0], "grid_width": data.grid[1], "groups": data.groups,
              "bits_per_group": data.bits_per_group, "num_classes": data.num_classes}
    given = cfg.model.overrides
    clash = {k: (given[k], v) for k, v in wanted.items() if k in given and given[k] != v}
    if clash:
        text = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in clash.items())
        raise InputError(cfg.data.train, f"model.overrides disagree with the token shards ({text})")
    return cfg.model_config().replace(**wanted)


def load_tokenizer(spec: str, tokenizer_id: str | None = None, weights_id: str | None = None, *,
                   source: object = "model.tokenizer") -> Any:
    """A WeTok from anything ``--model`` accepts (randomly initialised presets are seeded without touching the
    global RNG), checked against the architecture id and (where recorded) the weights id of the tokenizer that
    made the tokens."""
    from ..cli.models import load_model  # the one --model resolver (after the merge of main's registry)
    from ..presets import is_preset

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = load_model(spec, random_init=is_preset(spec) and not Path(spec).exists(), progress=False)
    if tokenizer_id is not None and tokenizer.model_id != tokenizer_id:
        raise InputError(source, f"tokenizer {spec} ({tokenizer.model_id}) did not make these tokens "
                                 f"({tokenizer_id})")
    if weights_id is not None and tokenizer.weights_id != weights_id:
        raise InputError(source, f"tokenizer {spec} has other trained weights ({tokenizer.weights_id}) than the one "
                                 f"that made these tokens ({weights_id})")
    return tokenizer.eval().requires_grad_(False)


def tokenizer_spec(cfg: Any, data: Any) -> str | None:
    """``model.tokenizer``, else the tokenizer named in the shards when it is a local folder or file, or a
    registered tokenizer with bundled weights (a Hub download is not started for a sample grid nobody asked for)."""
    from ..registry import find_model

    if cfg.model.tokenizer:
        spec = cfg.model.tokenizer
        return str(Path(spec).resolve()) if Path(spec).exists() else spec
    name = data.tokenizer_name
    if not name:
        return None
    if Path(name).exists():
        return str(Path(name).resolve())
    entry = find_model(name)
    bundled = entry is not None and entry.family == "tokenizer" and entry.weights is not None
    return name if bundled and entry.weights.source == "bundled" else None


def ar_model_from_checkpoint(ckpt: dict[str, Any], *, ema: bool = True, source: object = "checkpoint") -> Any:
    """The EMA (default; the live weights when the run kept no EMA) or live WeTok-AR of a generator training
    checkpoint, in eval mode."""
    from ..generation import WeTokAR, WeTokARConfig
    from .checkpoints import checkpoint_weights

    config, state = checkpoint_weights(ckpt, "model", WeTokARConfig, WeTokAR, ema=ema, source=source)
    model = WeTokAR(config)
    model.load_state_dict(state)
    return model.eval()


def generator_from_checkpoint(ckpt: dict[str, Any], *, ema: bool = True, source: object = "checkpoint") -> Any:
    """:func:`ar_model_from_checkpoint` with the run's tokenizer attached (``.tokenizer``, what
    ``save_pretrained`` writes into ``tokenizer/``) when the run knew one and it still loads; otherwise a
    warning, and the model alone."""
    model = ar_model_from_checkpoint(ckpt, ema=ema, source=source)
    spec = ckpt.get("tokenizer")
    if spec:
        try:
            saved = ckpt.get("data", {})
            model.tokenizer = load_tokenizer(spec, saved.get("tokenizer_id"), saved.get("tokenizer_weights_id"),
                                             source=source)
        except WetokError as err:
            log.warning("exporting without the tokenizer: %s", err)
    return model


def _load_init(path: str, config: Any) -> Any:
    from ..generation import WeTokAR
    from .checkpoints import load_training_checkpoint

    p = Path(path)
    if p.is_dir():
        model = WeTokAR.from_pretrained(p, tokenizer=False)
    else:
        ckpt = load_training_checkpoint(p)
        if ckpt.get("task") != "generator":
            raise InputError(p, "model.init of a generator must be a generator checkpoint or a WeTokAR folder")
        model = ar_model_from_checkpoint(ckpt, source=p)
    differ = {k for k in DATA_FIELDS + ("dim", "n_head", "spatial_layers", "intra_layers", "ffn_hidden")
              if getattr(model.config, k) != getattr(config, k)}
    if differ:
        raise InputError(p, f"model.init has another architecture than the recipe ({', '.join(sorted(differ))})")
    new = type(model)(config)  # the recipe's dropouts, the loaded weights
    new.load_state_dict(model.state_dict())
    return new


class GeneratorTask(Task):
    """WeTok-AR with AdamW on token shards; see the module docstring."""

    name = "generator"
    progress_keys = ("grad_norm",)

    # ------------------------------------------------------------------------------------------------ models
    def build(self, ckpt: dict[str, Any] | None) -> nn.Module:
        from ..generation import WeTokAR, WeTokARConfig

        cfg, fabric = self.cfg, self.fabric
        self.data = open_tokens(cfg.data.train, cfg.data.views, "data.train")
        if ckpt is not None:
            saved = ckpt.get("data", {})
            if saved.get("run") != self.data.index.run:
                raise InputError(cfg.data.train, "is not the token data set this run was trained on "
                                                 f"(tokenize run {saved.get('run')!r})")
            model = WeTokAR(WeTokARConfig.from_dict(ckpt["model_config"]))
        else:
            config = model_config_for(cfg, self.data)
            model = _load_init(cfg.model.init, config) if cfg.model.init else WeTokAR(config)
        model.train()
        bad = [c for c in cfg.samples.classes or () if c >= model.config.num_classes]
        if bad:
            raise InputError("config", f"samples.classes {bad} are not classes of the token data set "
                                       f"(0..{model.config.num_classes - 1})")
        o = cfg.optim
        groups = param_groups(model, o.weight_decay, decay_all=o.weight_decay_all)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        self.M, self.opt = fabric.setup(model, optimizer)
        self.M.mark_forward_method("loss")  # model.loss goes through the DDP / precision wrapper like forward
        self.tokenizer_spec = tokenizer_spec(cfg, self.data)
        self._tokenizer: Any = None
        if self.run.rank == 0 and self.tokenizer_spec is not None:
            try:
                self._tokenizer = load_tokenizer(self.tokenizer_spec, self.data.tokenizer_id,
                                                 self.data.tokenizer_weights_id)
            except WetokError as err:
                if cfg.model.tokenizer:
                    raise
                log.warning("sample grids show token maps: the shards' tokenizer is unusable (%s)", err)
                self.tokenizer_spec = None
        return self.M.module

    def optimizers(self) -> list[tuple[Optimizer, float]]:
        return [(self.opt, self.cfg.optim.lr)]

    def state(self) -> dict[str, Any]:
        return {
            "model_config": self.M.module.config.to_dict(),
            "model": self.M.module.state_dict(),
            "opt": self.opt.state_dict(),
            "data": {"run": self.data.index.run, "tokenizer_id": self.data.tokenizer_id,
                     "tokenizer_weights_id": self.data.tokenizer_weights_id, "class_names": self.data.class_names},
            "tokenizer": self.tokenizer_spec,
        }

    def load_state(self, ckpt: dict[str, Any]) -> None:
        self.M.module.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])

    # -------------------------------------------------------------------------------------------------- data
    def train_loader(self) -> DataLoader:
        run, d, t = self.run, self.cfg.data, self.cfg.trainer
        # the data set's identity, fixed at the first start (the checkpoint checks it again on resume)
        run.fixed_listing("train_tokens.txt", lambda: [f"{Path(d.train).resolve()}\t{self.data.index.run}"])
        sampler = StreamBatchSampler(len(self.data), d.micro_batch_size, seed=t.seed, start=run.position,
                                     rank=run.rank, world=run.world)
        return DataLoader(_Samples(self.data), batch_sampler=sampler, num_workers=d.num_workers,
                          collate_fn=collate_tokens, persistent_workers=d.num_workers > 0,
                          generator=torch.Generator().manual_seed(t.seed))

    def val_loader(self) -> DataLoader | None:
        d, run = self.cfg.data, self.run
        if not d.val:
            return None
        data = open_tokens(d.val, d.views, "data.val")
        if (data.grid, data.groups, data.bits_per_group) != (self.data.grid, self.data.groups,
                                                            self.data.bits_per_group):
            raise InputError(d.val, "validation tokens have another grid / groups / bits than data.train")
        count = min(len(data), d.val_max_images or len(data))
        mine = torch.utils.data.Subset(data, list(range(run.rank, count, run.world)))
        return DataLoader(_Samples(mine), batch_size=d.val_batch_size, collate_fn=collate_tokens,
                          generator=torch.Generator().manual_seed(self.cfg.trainer.seed))

    # --------------------------------------------------------------------------------------------- one step
    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Tensor]:
        fabric, run, k = self.fabric, self.run, self.run.accumulate
        sync = run.world > 1
        total = torch.zeros((), device=fabric.device)
        for i, batch in enumerate(batches):
            indices = batch["indices"].to(fabric.device, non_blocking=True)
            labels = batch["labels"].to(fabric.device, non_blocking=True)
            with fabric.no_backward_sync(self.M, enabled=sync and i < k - 1):
                loss = self.M.loss(indices, labels)
                fabric.backward(loss / k)
            total += loss.detach().float() / k
        logs: dict[str, Tensor] = {"loss": total}
        run.optimizer_step(self.M, self.opt, logs, "grad_norm")
        return logs

    # ------------------------------------------------------------------------------- validation and images
    @torch.no_grad()
    def validate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """The training loss (sum over sub-tokens of the mean cross-entropy) of ``model`` in eval mode (no class
        or other dropout) on the validation tokens, averaged over samples of all processes."""
        device = self.fabric.device
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in loader:
            indices, labels = batch["indices"].to(device), batch["labels"].to(device)
            with self.fabric.autocast():
                loss = model.loss(indices, labels)
            sums += torch.stack([loss.double() * len(labels), torch.tensor(len(labels), device=device).double()])
        sums = self.fabric.all_reduce(sums, reduce_op="sum")
        return {"val/loss": sums[0].item() / max(sums[1].item(), 1.0)}

    @torch.no_grad()
    def save_images(self, model: nn.Module, preview: Any, batches: list[dict[str, Any]], path: Path) -> None:
        """One row per class of ``samples.classes``: decoded samples, or the token maps (each sub-token's map
        side by side, grey levels = index) when no tokenizer is known."""
        from torchvision.utils import save_image

        from .._files import atomic_write

        s, device, seed = self.cfg.samples, self.fabric.device, self.cfg.trainer.seed
        classes = s.classes if s.classes is not None else list(range(min(10, model.config.num_classes)))
        labels = torch.tensor(classes, device=device).repeat_interleave(s.per_class)
        gen = torch.Generator(device).manual_seed(seed)
        tokens = model.generate(labels, cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k,
                                top_p=s.top_p, generator=gen)
        if self._tokenizer is not None:
            tokenizer = self._tokenizer.to(device)
            images = tokenizer.decode(tokens, generator=torch.Generator(device).manual_seed(seed))
            grid = images.float().clamp(-1, 1) * 0.5 + 0.5
        else:
            grid = token_map_picture(tokens, model.config.bits_per_group)
        atomic_write(path, lambda tmp: save_image(grid, tmp, nrow=s.per_class, padding=2), suffix=".png")


def token_map_picture(tokens: Tensor, bits_per_group: int, scale: int = 4) -> Tensor:
    """(B, h, w, g) indices -> (B, 1, h * scale, g * w * scale) grey pictures, sub-token maps side by side."""
    b, h, w, g = tokens.shape
    maps = tokens.float().div((1 << bits_per_group) - 1).permute(0, 1, 3, 2).reshape(b, 1, h, g * w)
    return maps.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).cpu()
