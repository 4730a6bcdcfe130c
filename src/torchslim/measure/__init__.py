"""Measurement: parameters, non-zeros, MACs, bytes (dense and on disk), and a latency harness."""

from torchslim.measure.counts import (
    MAC_COUNTERS,
    count_macs,
    count_nonzeros,
    count_parameters,
    dense_bytes,
    layer_table,
    register_mac_counter,
    stored_bytes,
)
from torchslim.measure.latency import BACKENDS, LatencyResult, compare_latency, detect_bimodal, measure_latency
from torchslim.measure.profile import profile

__all__ = [
    "BACKENDS",
    "MAC_COUNTERS",
    "LatencyResult",
    "compare_latency",
    "count_macs",
    "count_nonzeros",
    "count_parameters",
    "dense_bytes",
    "detect_bimodal",
    "layer_table",
    "measure_latency",
    "profile",
    "register_mac_counter",
    "stored_bytes",
]
