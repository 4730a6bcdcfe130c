"""Training and evaluation loops: seeded, reproducible, with callbacks and learning-rate schedules."""

from torchslim.train.evaluate import evaluate
from torchslim.train.fit import Callback, FitHistory, TrainConfig, TrainState, fit, seed_everything

__all__ = ["Callback", "FitHistory", "TrainConfig", "TrainState", "evaluate", "fit", "seed_everything"]
