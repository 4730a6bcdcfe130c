"""What this CPU offers integer kernels, read once per process from /proc/cpuinfo: whether ONNX Runtime's uint8 x int8
products need 7-bit weights (AVX2 without VNNI adds pairs of products in int16, which saturate with 8-bit weights)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

INT8_UNITS = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX"}  # flag -> name


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's flags, or None where /proc/cpuinfo cannot be read."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def int8_units() -> list[str]:
    """The names of the CPU's units that multiply uint8 by int8 into int32 directly."""
    return [name for flag, name in INT8_UNITS.items() if flag in (cpu_flags() or ())]


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies uint8 by int8 into int32 directly (AVX-512 VNNI, AVX-VNNI or AMX); a CPU that is not
    x86 has no saturating pairs to avoid (True); an x86 CPU whose flags cannot be read counts as without."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool(int8_units())
