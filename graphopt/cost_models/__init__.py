"""Cost models: pure functions of an FX node and a hardware description.

``hardware`` says what a device can do; ``compute`` turns a node into FLOPs, bytes moved
and milliseconds, by roofline estimate or by timing it on the device.
"""

from .compute import (
    MeasuredCostModel,
    OpCost,
    estimate_node_cost,
    node_bytes_moved,
    node_dtype,
    node_flops,
    roofline_ms,
)
from .hardware import PROFILES, HardwareProfile, get_hardware, local_cpu_profile, profile_for_device_name

__all__ = [
    "PROFILES",
    "HardwareProfile",
    "MeasuredCostModel",
    "OpCost",
    "estimate_node_cost",
    "get_hardware",
    "local_cpu_profile",
    "node_bytes_moved",
    "node_dtype",
    "node_flops",
    "profile_for_device_name",
    "roofline_ms",
]
