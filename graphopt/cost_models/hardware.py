"""What the machine can do, as plain numbers the cost models divide by.

A profile is data, not code: the optimizer only needs peak FLOP/s per dtype, memory and
host-link bandwidth, device memory and a per-op launch cost. Built-in profiles quote
vendor datasheets (dense throughput, no structured sparsity); a JSON file can describe any
other machine, and ``"auto"`` picks the profile of the device this process sees.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from ..errors import HardwareError

TERA = 1e12
GIGA = 1e9
GIB = 2**30

# The dtype whose throughput stands in for any dtype a profile does not list.
FALLBACK_DTYPE_NAME = "float32"
DTYPE_NAMES = ("float32", "tfloat32", "bfloat16", "float16", "float8", "int8")

# A CUDA kernel launch plus PyTorch's dispatcher costs a few microseconds per op on a
# modern host (PyTorch's profiler shows ~4-8 us of CPU time per eager aten op).
CUDA_KERNEL_OVERHEAD_MS = 0.005
# Jetson's Arm cores dispatch more slowly than a server x86 host.
JETSON_KERNEL_OVERHEAD_MS = 0.015
# Eager CPU ops pay the dispatcher and a parallel-region fork/join.
CPU_KERNEL_OVERHEAD_MS = 0.005

# PCIe Gen4 x16 is 32 GB/s per direction on paper; pinned-memory copies reach ~25 GB/s.
PCIE_GEN4_EFFECTIVE_BYTES_PER_S = 25 * GIGA
# PCIe Gen5 x16 is 64 GB/s per direction on paper; pinned-memory copies reach ~55 GB/s.
PCIE_GEN5_EFFECTIVE_BYTES_PER_S = 55 * GIGA

# Local CPU estimates, per core. AVX2 with two FMA ports retires 32 FP32 FLOP per cycle;
# at ~2.5 GHz that is 80 GFLOP/s peak, and PyTorch's CPU GEMMs sustain about half of it.
CPU_FLOPS_PER_CORE_PER_S = 40 * GIGA
# One core streams ~10 GB/s from DRAM; a socket saturates far below cores x 10 GB/s.
CPU_BANDWIDTH_PER_CORE_BYTES_PER_S = 10 * GIGA
CPU_BANDWIDTH_CAP_BYTES_PER_S = 100 * GIGA
# Moving a tensor to "host" memory on a CPU is a memcpy: every byte is read and written.
CPU_MEMCPY_FRACTION_OF_BANDWIDTH = 0.5
# Used when neither /proc/meminfo nor sysconf can tell the machine's memory.
CPU_FALLBACK_MEMORY_BYTES = 8 * GIB


@dataclass(frozen=True)
class HardwareProfile:
    """Throughputs and capacities of one device, in SI units named in each field."""

    name: str
    device_type: str
    memory_bytes: int
    peak_flops_per_s: Mapping[str, float] = dataclasses.field(hash=False)
    memory_bandwidth_bytes_per_s: float
    host_link_bytes_per_s: float
    kernel_overhead_ms: float
    source: str

    def __post_init__(self) -> None:
        # A read-only copy, so no caller can change a shared built-in profile's numbers.
        object.__setattr__(self, "peak_flops_per_s", MappingProxyType(dict(self.peak_flops_per_s)))

    def flops_per_s(self, dtype: torch.dtype) -> float:
        """Peak dense FLOP/s for ``dtype``; dtypes the profile does not list count as float32."""
        name = dtype_name(dtype)
        if name in self.peak_flops_per_s:
            return float(self.peak_flops_per_s[name])
        return float(self.peak_flops_per_s[FALLBACK_DTYPE_NAME])

    @property
    def has_fp8_units(self) -> bool:
        """Whether the device computes in fp8 faster than in fp16 (H100, L4, RTX 4090): the
        profiles of devices with fp8 tensor cores list a "float8" figure above "float16"."""
        return self.flops_per_s(torch.float8_e4m3fn) > self.flops_per_s(torch.float16)

    def to_json(self) -> dict:
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["peak_flops_per_s"] = dict(self.peak_flops_per_s)
        return data

    @classmethod
    def from_json(cls, data: dict) -> HardwareProfile:
        """A profile from its ``to_json`` form; a missing or bad field raises HardwareError."""
        return cls(**_validated_fields(data))


def dtype_name(dtype: torch.dtype) -> str:
    """The profile key for a torch dtype: every fp8 variant is "float8", uint8 is "int8"."""
    name = str(dtype).removeprefix("torch.")
    if name.startswith("float8"):
        return "float8"
    if name == "uint8":
        return "int8"
    return name


_TEXT = ((str,), "a string")
_INTEGER = ((int,), "an integer")
_NUMBER = ((int, float), "a number")
# Each field's JSON types and how an error message names them.
_FIELD_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": _TEXT,
    "device_type": _TEXT,
    "memory_bytes": _INTEGER,
    "peak_flops_per_s": ((dict,), "an object of dtype name -> FLOP/s"),
    "memory_bandwidth_bytes_per_s": _NUMBER,
    "host_link_bytes_per_s": _NUMBER,
    "kernel_overhead_ms": _NUMBER,
    "source": _TEXT,
}
_DEVICE_TYPES = ("cuda", "cpu")
_POSITIVE_FIELDS = ("memory_bytes", "memory_bandwidth_bytes_per_s", "host_link_bytes_per_s")


def _validated_fields(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise HardwareError(f"a hardware profile must be a JSON object, got {type(data).__name__}")
    missing = [key for key in _FIELD_KINDS if key not in data]
    unknown = sorted(set(data) - set(_FIELD_KINDS))
    if missing or unknown:
        raise HardwareError(
            f"hardware profile fields: missing {missing}, unknown {unknown}; "
            f"a profile needs exactly {list(_FIELD_KINDS)}"
        )
    for key, (kinds, words) in _FIELD_KINDS.items():
        if not _is_kind(data[key], kinds):
            raise HardwareError(f"hardware profile field {key!r} must be {words}, got {data[key]!r}")
    if data["device_type"] not in _DEVICE_TYPES:
        raise HardwareError(
            f"hardware profile field 'device_type' must be one of {_DEVICE_TYPES}, got {data['device_type']!r}"
        )
    for key in _POSITIVE_FIELDS:
        if data[key] <= 0:
            raise HardwareError(f"hardware profile field {key!r} must be positive, got {data[key]!r}")
    if data["kernel_overhead_ms"] < 0:
        raise HardwareError(
            f"hardware profile field 'kernel_overhead_ms' must be >= 0, got {data['kernel_overhead_ms']!r}"
        )
    _check_peak_flops(data["peak_flops_per_s"])
    return dict(data)


def _is_kind(value: Any, kinds: tuple[type, ...]) -> bool:
    # JSON true/false are Python bools, which are ints; no field means a bool.
    return isinstance(value, kinds) and not isinstance(value, bool)


def _check_peak_flops(peak_flops_per_s: dict) -> None:
    if FALLBACK_DTYPE_NAME not in peak_flops_per_s:
        raise HardwareError(
            f"hardware profile 'peak_flops_per_s' needs a {FALLBACK_DTYPE_NAME!r} entry "
            f"(other dtypes fall back to it); known dtype names: {list(DTYPE_NAMES)}"
        )
    for dtype, flops_per_s in peak_flops_per_s.items():
        if not _is_kind(flops_per_s, _NUMBER[0]) or flops_per_s <= 0:
            raise HardwareError(
                f"hardware profile 'peak_flops_per_s'[{dtype!r}] must be a positive number, got {flops_per_s!r}"
            )


PROFILES: dict[str, HardwareProfile] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 80GB, dense figures (sparse halved):
    # FP32 67 TF, TF32 494.5 TF, BF16/FP16 989.5 TF, FP8 1979 TF, INT8 1979 TOPS, HBM3 3.35 TB/s.
    # Host link: PCIe Gen5 x16, ~55 GB/s effective.
    "h100": HardwareProfile(
        name="h100",
        device_type="cuda",
        memory_bytes=80 * GIB,
        peak_flops_per_s={"float32": 67 * TERA, "tfloat32": 494.5 * TERA, "bfloat16": 989.5 * TERA,
                          "float16": 989.5 * TERA, "float8": 1979 * TERA, "int8": 1979 * TERA},
        memory_bandwidth_bytes_per_s=3.35 * TERA,
        host_link_bytes_per_s=PCIE_GEN5_EFFECTIVE_BYTES_PER_S,
        kernel_overhead_ms=CUDA_KERNEL_OVERHEAD_MS,
        source="NVIDIA H100 datasheet (SXM5 80GB, dense); PCIe Gen5 x16 effective host link",
    ),
    # NVIDIA A100 datasheet, 80GB SXM, dense: FP32 19.5 TF, TF32 156 TF, BF16/FP16 312 TF,
    # INT8 624 TOPS, HBM2e 2,039 GB/s. No FP8 units: fp8 falls back to the float32 figure.
    "a100": HardwareProfile(
        name="a100",
        device_type="cuda",
        memory_bytes=80 * GIB,
        peak_flops_per_s={"float32": 19.5 * TERA, "tfloat32": 156 * TERA, "bfloat16": 312 * TERA,
                          "float16": 312 * TERA, "int8": 624 * TERA},
        memory_bandwidth_bytes_per_s=2039 * GIGA,
        host_link_bytes_per_s=PCIE_GEN4_EFFECTIVE_BYTES_PER_S,
        kernel_overhead_ms=CUDA_KERNEL_OVERHEAD_MS,
        source="NVIDIA A100 datasheet (80GB SXM, dense); PCIe Gen4 x16 effective host link",
    ),
    # NVIDIA L4 datasheet (sparse figures halved): FP32 30.3 TF, TF32 60 TF, BF16/FP16 121 TF,
    # FP8 242.5 TF, INT8 242.5 TOPS, 24 GB GDDR6 at 300 GB/s, PCIe Gen4 x16.
    "l4": HardwareProfile(
        name="l4",
        device_type="cuda",
        memory_bytes=24 * GIB,
        peak_flops_per_s={"float32": 30.3 * TERA, "tfloat32": 60 * TERA, "bfloat16": 121 * TERA,
                          "float16": 121 * TERA, "float8": 242.5 * TERA, "int8": 242.5 * TERA},
        memory_bandwidth_bytes_per_s=300 * GIGA,
        host_link_bytes_per_s=PCIE_GEN4_EFFECTIVE_BYTES_PER_S,
        kernel_overhead_ms=CUDA_KERNEL_OVERHEAD_MS,
        source="NVIDIA L4 datasheet (dense); PCIe Gen4 x16 effective host link",
    ),
    # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090, dense, FP32 accumulate
    # (what PyTorch uses): FP32 82.6 TF, TF32 82.6 TF, BF16/FP16 165.2 TF, FP8 330.3 TF,
    # INT8 660.6 TOPS; 24 GB GDDR6X at 1,008 GB/s; PCIe Gen4 x16.
    "rtx4090": HardwareProfile(
        name="rtx4090",
        device_type="cuda",
        memory_bytes=24 * GIB,
        peak_flops_per_s={"float32": 82.6 * TERA, "tfloat32": 82.6 * TERA, "bfloat16": 165.2 * TERA,
                          "float16": 165.2 * TERA, "float8": 330.3 * TERA, "int8": 660.6 * TERA},
        memory_bandwidth_bytes_per_s=1008 * GIGA,
        host_link_bytes_per_s=PCIE_GEN4_EFFECTIVE_BYTES_PER_S,
        kernel_overhead_ms=CUDA_KERNEL_OVERHEAD_MS,
        source="NVIDIA Ada whitepaper, RTX 4090 (dense, FP32 accumulate); PCIe Gen4 x16 effective host link",
    ),
    # NVIDIA Jetson AGX Orin 64GB module datasheet / technical brief, GPU only (no DLA):
    # 2048 CUDA cores at 1.3 GHz -> FP32 5.3 TF; tensor cores INT8 85 TOPS dense (170 sparse),
    # FP16/BF16 42.5 TF, TF32 21.3 TF dense. 64 GB LPDDR5 at 204.8 GB/s shared with the CPU,
    # so "offload" is a copy within the same DRAM: it reads and writes every byte.
    "orin": HardwareProfile(
        name="orin",
        device_type="cuda",
        memory_bytes=64 * GIB,
        peak_flops_per_s={"float32": 5.3 * TERA, "tfloat32": 21.3 * TERA, "bfloat16": 42.5 * TERA,
                          "float16": 42.5 * TERA, "int8": 85 * TERA},
        memory_bandwidth_bytes_per_s=204.8 * GIGA,
        host_link_bytes_per_s=102.4 * GIGA,
        kernel_overhead_ms=JETSON_KERNEL_OVERHEAD_MS,
        source="NVIDIA Jetson AGX Orin 64GB datasheet (GPU, dense); shared LPDDR5, copy at half bandwidth",
    ),
    # A generic 16-core x86 server socket, from the per-core estimates above; the "auto"
    # CPU profile measures the local machine's memory and core count instead.
    "cpu": HardwareProfile(
        name="cpu",
        device_type="cpu",
        memory_bytes=64 * GIB,
        peak_flops_per_s={"float32": 16 * CPU_FLOPS_PER_CORE_PER_S},
        memory_bandwidth_bytes_per_s=min(16 * CPU_BANDWIDTH_PER_CORE_BYTES_PER_S, CPU_BANDWIDTH_CAP_BYTES_PER_S),
        host_link_bytes_per_s=CPU_MEMCPY_FRACTION_OF_BANDWIDTH * CPU_BANDWIDTH_CAP_BYTES_PER_S,
        kernel_overhead_ms=CPU_KERNEL_OVERHEAD_MS,
        source="generic 16-core AVX2 server: 40 GFLOP/s fp32 and 10 GB/s DRAM per core (estimates), 64 GiB",
    ),
}

# Words in torch.cuda.get_device_name() that identify each built-in GPU profile. Whole
# words only, so "NVIDIA L40S" does not match "l4".
_DEVICE_NAME_WORDS = {"h100": "h100", "h200": "h100", "gh200": "h100", "a100": "a100",
                      "l4": "l4", "4090": "rtx4090", "orin": "orin"}


def profile_for_device_name(device_name: str, total_memory_bytes: int) -> HardwareProfile:
    """The built-in profile closest to a CUDA device, with the device's real memory size.

    A device no profile names raises HardwareError: another GPU's throughputs would price
    every recomputation wrongly (and offer fp8 where it may have no fp8 units).
    """
    words = re.split(r"[^a-z0-9]+", device_name.lower())
    for word in words:
        if word in _DEVICE_NAME_WORDS:
            profile = PROFILES[_DEVICE_NAME_WORDS[word]]
            return dataclasses.replace(
                profile, memory_bytes=total_memory_bytes,
                source=f"{profile.source}; memory as reported by {device_name}",
            )
    raise HardwareError(
        f"graphopt has no hardware profile for this GPU ({device_name!r}); it knows {sorted(PROFILES)} "
        f"(and recognises {sorted(_DEVICE_NAME_WORDS)} in device names). Pass hardware=<one of those> to plan with "
        "its figures, or describe this GPU: HardwareProfile(name=..., device_type='cuda', memory_bytes=..., "
        "peak_flops_per_s={'float32': ..., 'bfloat16': ...}, memory_bandwidth_bytes_per_s=..., "
        "host_link_bytes_per_s=..., kernel_overhead_ms=0.005, source=...) from its datasheet, then pass it as "
        "hardware=, or save json.dumps(profile.to_json()) to a file and pass hardware='that.json' "
        "(graphopt plan --hardware that.json)"
    )


def get_hardware(spec: str | HardwareProfile | None = "auto") -> HardwareProfile:
    """A profile from a name in PROFILES, a JSON file path, a profile, or "auto"/None."""
    if isinstance(spec, HardwareProfile):
        return spec
    if isinstance(spec, os.PathLike):
        return _profile_from_file(os.fspath(spec))
    if spec is None or spec.lower() == "auto":
        return _auto_profile()
    if spec.lower() in PROFILES:
        return PROFILES[spec.lower()]
    if os.path.isfile(spec):
        return _profile_from_file(spec)
    raise HardwareError(
        f"unknown hardware {spec!r}: use 'auto', one of {sorted(PROFILES)}, "
        "or the path of a JSON file written by HardwareProfile.to_json()"
    )


def _profile_from_file(path: str) -> HardwareProfile:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise HardwareError(
            f"cannot read hardware profile {path}: {error}; fix the file or pass a profile name"
        ) from error
    return HardwareProfile.from_json(data)


def _auto_profile() -> HardwareProfile:
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return profile_for_device_name(torch.cuda.get_device_name(), int(properties.total_memory))
    return local_cpu_profile()


@functools.cache
def local_cpu_profile() -> HardwareProfile:
    """This machine's CPU: real memory and core count, throughputs from per-core estimates."""
    cores = _available_cores()
    bandwidth_bytes_per_s = min(cores * CPU_BANDWIDTH_PER_CORE_BYTES_PER_S, CPU_BANDWIDTH_CAP_BYTES_PER_S)
    return HardwareProfile(
        name="cpu",
        device_type="cpu",
        memory_bytes=_total_memory_bytes(),
        peak_flops_per_s={FALLBACK_DTYPE_NAME: cores * CPU_FLOPS_PER_CORE_PER_S},
        memory_bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        host_link_bytes_per_s=CPU_MEMCPY_FRACTION_OF_BANDWIDTH * bandwidth_bytes_per_s,
        kernel_overhead_ms=CPU_KERNEL_OVERHEAD_MS,
        source=(
            f"measured on this machine: {cores} cores, memory from /proc/meminfo; estimated "
            f"{CPU_FLOPS_PER_CORE_PER_S / GIGA:g} GFLOP/s fp32 and "
            f"{CPU_BANDWIDTH_PER_CORE_BYTES_PER_S / GIGA:g} GB/s DRAM per core (AVX2 FMA at ~2.5 GHz, "
            f"half of peak), bandwidth capped at {CPU_BANDWIDTH_CAP_BYTES_PER_S / GIGA:g} GB/s"
        ),
    )


def _available_cores() -> int:
    # Cores this process may run on (a container's cpuset), not the whole machine.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _total_memory_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return CPU_FALLBACK_MEMORY_BYTES
