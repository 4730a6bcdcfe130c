"""torchslim: make trained PyTorch models smaller and faster while keeping their accuracy.

Example:
    >>> import torchslim as ts
    >>> data = ts.data.load("mnist-sample")                  # offline: 4,000 / 1,000 real MNIST digits
    >>> model = ts.models.lenet_300_100()
    >>> result = ts.train(model, data, {"epochs": 1}, progress=False)
    >>> ts.evaluate(result.model, data)["accuracy"] > 0.8
    True
"""

from torchslim import codec, compression, data, io, llm, measure, models, report, tasks
from torchslim.compression import factorize, narrow, remove_blocks, sensitivity, substitute_activations
from torchslim.core import Config, ConfigError, Report, Result, TorchslimError
from torchslim.core.checks import allow_nonfinite
from torchslim.data.sources import Data
from torchslim.distillation import distill
from torchslim.export.verb import export  # the verb; the package stays importable as torchslim.export
from torchslim.llm import quantize as _llm_quantize  # noqa: F401 - registers the gptq method
from torchslim.measure.profile import profile
from torchslim.pipeline import compress
from torchslim.pruning import make_permanent, prune, prune_channels
from torchslim.quantization import quantize
from torchslim.tasks import Task
from torchslim.train.evaluate import evaluate
from torchslim.verbs import load, save, train
from torchslim.version import __version__

__all__ = [
    "Config",
    "ConfigError",
    "Data",
    "Report",
    "Result",
    "Task",
    "TorchslimError",
    "__version__",
    "allow_nonfinite",
    "codec",
    "compress",
    "compression",
    "data",
    "distill",
    "evaluate",
    "export",
    "factorize",
    "io",
    "llm",
    "load",
    "make_permanent",
    "measure",
    "models",
    "narrow",
    "profile",
    "prune",
    "prune_channels",
    "quantize",
    "remove_blocks",
    "report",
    "save",
    "sensitivity",
    "substitute_activations",
    "tasks",
    "train",
]
