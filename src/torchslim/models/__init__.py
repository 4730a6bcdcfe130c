"""Reference models, by name from a registry; each model records how to rebuild it (its architecture spec).

Example:
    >>> import torchslim as ts
    >>> model = ts.models.create("lenet-300-100")
    >>> sum(p.numel() for p in model.parameters())
    266610
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry
from torchslim.core.spec import set_spec
from torchslim.models.lenet import MLP, LeNet5, LeNet300100
from torchslim.models.mobilenetv2 import MobileNetV2
from torchslim.models.resnet_cifar import CifarResNet, resnet18_style, resnet_cifar
from torchslim.models.transformer import CausalSelfAttention, CharTransformer

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

MODELS.register("lenet-300-100", "784-300-100-10 fully connected net (266,610 params), for MNIST")(LeNet300100)
MODELS.register("mlp", "fully connected net with configurable hidden widths and dropout (distillation teachers/students)")(MLP)
MODELS.register("lenet-5", "Caffe LeNet-5: conv20-pool-conv50-pool-fc500-fc10 (431,080 params), for MNIST")(LeNet5)
for _depth in (20, 32, 44, 56):
    MODELS.register(f"resnet{_depth}", f"ResNet-{_depth} for CIFAR-10 with option-A shortcuts")(lambda _d=_depth, **kw: resnet_cifar(_d, **kw))
MODELS.register("resnet18-style", "ResNet-18-style net for 32x32 inputs, projection shortcuts")(resnet18_style)
MODELS.register("mobilenetv2", "MobileNetV2-style net (depthwise convs, inverted residuals) for 32x32 inputs")(MobileNetV2)
MODELS.register("char-transformer", "small decoder-only character-level transformer")(CharTransformer)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model and record its spec (name and arguments) so that model files can rebuild it."""
    model = MODELS.get(name)(**kwargs)
    set_spec(model, {"name": name, "kwargs": dict(kwargs)})
    return model


def lenet_300_100(**kwargs: Any) -> nn.Module:
    """LeNet-300-100 (see ``create``)."""
    return create("lenet-300-100", **kwargs)


def lenet5(**kwargs: Any) -> nn.Module:
    """Caffe LeNet-5 (see ``create``)."""
    return create("lenet-5", **kwargs)


def names() -> list[str]:
    return MODELS.names()


__all__ = [
    "MLP",
    "MODELS",
    "CausalSelfAttention",
    "CharTransformer",
    "CifarResNet",
    "LeNet5",
    "LeNet300100",
    "MobileNetV2",
    "create",
    "create_for",
    "lenet5",
    "lenet_300_100",
    "names",
]


def create_for(name: str, dataset: Any, **kwargs: Any) -> nn.Module:
    """Build a registered model sized for a dataset (input features, channels, image size, classes, vocabulary).

    Example:
        >>> import torchslim as ts
        >>> model = create_for("lenet-300-100", ts.data.load("digits"))   # 8x8 digits: 64 inputs
        >>> model.fc1.in_features
        64
    """
    MODELS.get(name)
    fitted: dict[str, Any] = {}
    vocab_size = getattr(dataset, "vocab_size", None)
    if vocab_size is not None:
        if name != "char-transformer":
            raise TorchslimError(f"model {name!r} does not take text; use char-transformer for {getattr(dataset, 'name', 'text')}")
        fitted["vocab_size"] = vocab_size
    else:
        shape = tuple(dataset.input_shape)
        classes = int(dataset.num_classes)
        if name == "char-transformer":
            raise TorchslimError("char-transformer needs a text dataset (e.g. shakespeare)")
        fitted["num_classes"] = classes
        if name in ("lenet-300-100", "mlp"):
            features = 1
            for size in shape:
                features *= size
            fitted["in_features"] = features
        else:
            fitted["in_channels"] = shape[0]
            if name == "lenet-5":
                fitted["input_size"] = shape[-1]
    fitted.update(kwargs)
    return create(name, **fitted)
