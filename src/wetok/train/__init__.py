"""Training on Lightning Fabric: one engine (:mod:`.run`) for two tasks, the two-stage WeTok tokenizer
(:mod:`.tokenizer`: data stream, losses per stage, discriminator) and the WeTok-AR generator on token shards
(:mod:`.generator`); recipes (:mod:`.config`), EMA.

``wetok train CONFIG [key=value ...] --output DIR [--resume]`` is the command-line entry; in Python::

    from wetok.train import load_config, train
    train(load_config("configs/train/cpu-small.yaml", ["data.train=photos/"]), "runs/small")
    train(load_config("configs/train/ar-cifar10.yaml", ["data.train=tokens/cifar10-train"]), "runs/ar")
"""

from .config import TrainConfig, load_config
from .ema import EMA
from .run import latest_checkpoint, train

__all__ = ["EMA", "TrainConfig", "latest_checkpoint", "load_config", "train"]
