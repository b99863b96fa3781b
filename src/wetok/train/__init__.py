"""Two-stage WeTok training on Lightning Fabric: recipes, data stream, losses per stage, EMA, the engine.

``wetok train CONFIG [key=value ...] --output DIR [--resume]`` is the command-line entry; in Python::

    from wetok.train import load_config, train
    train(load_config("configs/train/cpu-small.yaml", ["data.train=photos/"]), "runs/small")
"""

from .config import TrainConfig, load_config
from .ema import EMA
from .run import latest_checkpoint, train

__all__ = ["EMA", "TrainConfig", "latest_checkpoint", "load_config", "train"]
