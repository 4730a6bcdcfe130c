"""torchslim: make trained PyTorch models smaller and faster while keeping their accuracy.

Example:
    >>> import torchslim as ts
    >>> data = ts.data.load("mnist-sample")                  # offline: 4,000 / 1,000 real MNIST digits
    >>> model = ts.models.lenet_300_100()
    >>> result = ts.train(model, data, {"epochs": 1})
    >>> ts.evaluate(result.model, data)["accuracy"] > 0.8
    True
"""

from torchslim import data, measure, models
from torchslim.core import Config, ConfigError, Report, Result, TorchslimError
from torchslim.distillation import distill
from torchslim.pruning import make_permanent, prune, prune_channels
from torchslim.measure.profile import profile
from torchslim.verbs import compress, evaluate, load, quantize, save, train

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Report",
    "Result",
    "TorchslimError",
    "compress",
    "data",
    "distill",
    "evaluate",
    "load",
    "measure",
    "make_permanent",
    "models",
    "profile",
    "prune",
    "prune_channels",
    "quantize",
    "save",
    "train",
]
