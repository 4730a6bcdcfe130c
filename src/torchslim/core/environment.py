"""Facts about the machine and libraries, recorded in reports."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Machine and library versions for reports and benchmarks."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
