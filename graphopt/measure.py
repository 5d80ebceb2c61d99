"""Measure the peak memory of one call, the way graphopt's budgets are stated.

On CUDA the peak is what the caching allocator reports (``torch.cuda.max_memory_allocated``)
above what was allocated just before the call. On CPU it is the process's resident-set
high-water mark (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``)
above the resident size just before the call. Both exclude what was already live, so a
training step measured this way excludes the parameters and anything else made earlier.

CPU measurements need glibc to give freed tensors back to the kernel. glibc serves
allocations above ``M_MMAP_THRESHOLD`` with ``mmap`` and unmaps them on free, but its
default threshold grows dynamically (up to 32 MiB) as large blocks are freed, after which
freed tensors stay resident in the heap and the high-water mark overstates the live peak.
Set ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment *before the process starts*
(glibc reads it once, at start-up; setting ``os.environ`` later has no effect), e.g.
``MALLOC_MMAP_THRESHOLD_=65536 python train.py``. Fixing the threshold also disables the
dynamic growth, so every tensor above 64 KiB is mmapped and freed memory leaves the process.
"""

from __future__ import annotations

import functools
import gc
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import torch_private
from .errors import GraphoptError

_CLEAR_REFS_PATH = "/proc/self/clear_refs"
_STATUS_PATH = "/proc/self/status"
# Writing this to clear_refs resets the peak resident set size (VmHWM) to the current one.
_RESET_PEAK_RSS = "5"
_MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"


@dataclass(frozen=True)
class PeakMemory:
    """The peak memory of one call.

    ``peak_bytes`` is the high-water mark during the call minus ``baseline_bytes``, the
    bytes resident (CPU) or allocated (CUDA) just before it.
    """

    peak_bytes: int
    baseline_bytes: int
    device: str  # "cuda:0" or "cpu"
    method: str  # "torch.cuda.max_memory_allocated", "VmHWM" or "allocator (profiler)"


CPU_METHODS = ("resident", "allocated")


def measure_peak(
    fn: Callable[[], object], *, device: str | torch.device | None = None, cpu_method: str = "resident"
) -> tuple[object, PeakMemory]:
    """Call ``fn()`` and return its result with the peak memory it used above the baseline.

    ``device`` picks what to measure: a CUDA device (the caching allocator's
    ``max_memory_allocated``) or ``"cpu"`` (the process's resident-set high-water mark,
    Linux only). Without it, the current CUDA device if CUDA is available, else the CPU.

    On CPU, glibc needs ``MALLOC_MMAP_THRESHOLD_=65536`` set *before the process starts*
    so that large tensors are mmapped and freed memory leaves the process; without it
    freed tensors may stay resident and the peak is overstated (a warning says so once).
    The CPU figure is the whole process's: other threads' allocations during the call count.

    ``cpu_method="allocated"`` measures on CPU what ``max_memory_allocated`` measures on
    CUDA instead: the peak of bytes torch's CPU allocator handed out during the call,
    replayed from the profiler's allocation events (``baseline_bytes`` is then 0; the
    call runs slower under the profiler). Memory that is not a tensor's (Python objects,
    a library's own buffers) is not in it. The resident high-water mark counts
    everything, but on some machines it has read well below the tensors the call held
    (80 MB for a step whose allocations peaked at 102 MB; docs/benchmarks.md).
    """
    if cpu_method not in CPU_METHODS:
        raise GraphoptError(f"cpu_method={cpu_method!r}; choose one of {CPU_METHODS}")
    resolved = _resolve_device(device)
    if resolved.type == "cuda":
        return _measure_cuda(fn, resolved)
    if resolved.type == "cpu" and cpu_method == "allocated":
        result, peak_bytes = torch_private.cpu_allocated_peak(fn)
        return result, PeakMemory(peak_bytes=peak_bytes, baseline_bytes=0, device="cpu", method="allocator (profiler)")
    if resolved.type == "cpu":
        return _measure_cpu(fn)
    raise GraphoptError(
        f"measure_peak cannot measure device {str(resolved)!r}; pass device='cpu' or a CUDA device"
    )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def _measure_cuda(fn: Callable[[], object], device: torch.device) -> tuple[object, PeakMemory]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline_bytes = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak_bytes = torch.cuda.max_memory_allocated(device) - baseline_bytes
    memory = PeakMemory(
        peak_bytes=max(peak_bytes, 0),
        baseline_bytes=baseline_bytes,
        device=str(device),
        method="torch.cuda.max_memory_allocated",
    )
    return result, memory


def _measure_cpu(fn: Callable[[], object]) -> tuple[object, PeakMemory]:
    if _MMAP_THRESHOLD_VARIABLE not in os.environ:
        _warn_mmap_threshold_unset()
    # Collect first so garbage from before the call is neither in the baseline nor freed
    # (and re-used) during the call.
    gc.collect()
    _reset_peak_resident_bytes()
    baseline_bytes = _read_status_bytes("VmRSS")
    result = fn()
    peak_bytes = _read_status_bytes("VmHWM") - baseline_bytes
    memory = PeakMemory(peak_bytes=max(peak_bytes, 0), baseline_bytes=baseline_bytes, device="cpu", method="VmHWM")
    return result, memory


@functools.cache
def _warn_mmap_threshold_unset() -> None:
    warnings.warn(
        f"{_MMAP_THRESHOLD_VARIABLE} is not set: glibc may keep freed tensors resident, so "
        f"CPU peak measurements overstate the live peak. Start the process with "
        f"{_MMAP_THRESHOLD_VARIABLE}=65536 in its environment.",
        RuntimeWarning,
        stacklevel=4,
    )


def _reset_peak_resident_bytes() -> None:
    try:
        with open(_CLEAR_REFS_PATH, "w") as clear_refs:
            clear_refs.write(_RESET_PEAK_RSS)
    except OSError as error:
        raise GraphoptError(
            f"cannot reset the peak resident set size through {_CLEAR_REFS_PATH} ({error}); "
            "CPU peak measurement needs Linux. Measure on a Linux machine or on a CUDA device."
        ) from error


def _read_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (reported in kB) in bytes."""
    with open(_STATUS_PATH) as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                amount, unit = value.split()
                if unit != "kB":
                    raise GraphoptError(f"unexpected unit {unit!r} for {field} in {_STATUS_PATH}")
                return int(amount) * 1024
    raise GraphoptError(f"{field} is missing from {_STATUS_PATH}; CPU peak measurement needs Linux")
