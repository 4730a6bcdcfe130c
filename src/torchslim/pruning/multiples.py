"""The channel multiple each engine runs fastest with: pruned channel counts rounded to it (``round_to``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchslim.core.config import check


def _cpu_block() -> int:
    """The channel block of CPU convolutions: ONNX Runtime (NCHWc) and oneDNN lay channels out in blocks as wide as the
    vector unit, 16 floats with AVX-512 and 8 with AVX2."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


# The channel multiple each engine ran fastest with (benchmarks/channel_multiples.py: ResNet-56 and MobileNetV2-style
# at 2x fewer MACs, kept counts rounded to 1, 4, 8 and 16, on an AVX-512 CPU). ONNX Runtime: 16 gave 1.46x / 1.40x
# (ResNet-56, batch 1 / 64) and 1.57x / 1.87x (MobileNetV2) where unrounded counts ran slower than the dense models
# (0.94x / 0.97x, 0.74x / 0.68x); eager PyTorch: 16 best on MobileNetV2 (1.28x / 1.82x against 1.07x / 1.69x
# unrounded), ResNet-56 about the same at every multiple. CUDA (benchmarks/gpu_multiples.py, an H200): in bf16
# multiples of 8 ran ResNet-56 1.61x faster than dense at batch 1 where unrounded counts gave 1.31x (MobileNetV2:
# 0.89x against 0.65x); in fp32 these small nets ran no faster pruned at any multiple (launch-bound).
CHANNEL_MULTIPLES: dict[str, Callable[[], int]] = {"onnxruntime": _cpu_block, "eager": _cpu_block, "cuda": lambda: 8}


def check_round_to(round_to: int | str) -> None:
    """A config error unless ``round_to`` is a positive multiple or an engine in ``CHANNEL_MULTIPLES``."""
    if isinstance(round_to, str):
        check(round_to in CHANNEL_MULTIPLES, f"round_to must be an integer >= 1 or one of {', '.join(CHANNEL_MULTIPLES)}, got {round_to!r}")
    else:
        check(round_to >= 1, f"round_to must be >= 1, got {round_to}")


def channel_multiple(round_to: int | str) -> int:
    """The channel multiple ``round_to`` stands for: itself, or the one measured best for the named engine here."""
    return CHANNEL_MULTIPLES[round_to]() if isinstance(round_to, str) else round_to


__all__ = ["CHANNEL_MULTIPLES", "channel_multiple", "check_round_to"]
