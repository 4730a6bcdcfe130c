"""Shared building blocks: errors, typed configs, registries, reports."""

from torchslim.core.config import Config, ConfigError
from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry
from torchslim.core.report import Report, Result, Stage

__all__ = ["Config", "ConfigError", "Registry", "Report", "Result", "Stage", "TorchslimError"]
