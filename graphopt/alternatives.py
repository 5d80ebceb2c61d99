"""What offloading or quantizing a candidate would cost: its ``Alternative``s for the program.

Per candidate of ``S`` bytes, produced at step ``P``, freed in the forward after ``F``,
needed in the backward from ``U`` to ``L`` (timeline steps, as in ``problem.py``):

- ``quantize(b)`` (``b``: 8, 4 or 2 bits, or "fp8"): a copy of ``q =
  quantized_bytes(numel, b)`` from ``P`` to ``U`` (the dequantization frees it), then
  the full tensor from ``U`` to ``L``. Time: one quantize and one dequantize kernel on
  the roofline (bytes read and written at the memory bandwidth, plus a launch). Error:
  ``relative_squared_error(b)``.
- ``offload``: the copy to host takes ``T = S / host_link`` and overlaps the forward
  compute after ``P``; the device keeps the tensor until the step where that compute
  reaches ``T`` (past ``F`` only if it has to). The prefetch starts at the latest
  backward step whose compute before ``U`` covers ``T`` (at ``U``, exposed whole, when
  none does); the tensor is on the device from there to ``L``. Time: the part of each
  copy that no compute hides.
- ``offload-quantized(b)``: quantize, then offload the ``q``-byte copy; the prefetched
  copy is dequantized at ``U``.

The side stream is modelled per tensor: copies of different tensors are not queued
behind each other. On a CPU the "host" is the same memory, so an offloaded copy also
counts as device memory while it exists; offloading never pays there and is offered only
when the user's checkpoint policy asks for it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch

from .cost_models import HardwareProfile
from .ops.quantize import can_quantize, quantized_bytes, relative_squared_error
from .problem import OFFLOAD, OFFLOAD_QUANTIZED, QUANTIZE, Alternative

# Smaller tensors are not worth the extra kernels (or the program's extra columns).
MIN_ALTERNATIVE_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class AlternativeSettings:
    """What the options allow: lossy widths, and whether offloading may pay at all."""

    quantize_bits: tuple[int | str, ...] = ()  # widths and "fp8"; () keeps every result exact
    offload: bool = False  # the device has a host link worth using (not a CPU)


@dataclasses.dataclass(frozen=True)
class Lifetime:
    produced: int
    free_at: int
    first_use: int
    last_use: int


class AlternativePricer:
    """Prices alternatives on one timeline: ``step_ms[t]`` is the compute time of step ``t``."""

    def __init__(self, hardware: HardwareProfile, step_ms: Sequence[float], num_forward_steps: int):
        self._hardware = hardware
        self._cumulative = [0.0, *itertools.accumulate(step_ms)]
        self._num_forward = num_forward_steps

    def alternatives(
        self, value: object, lifetime: Lifetime, *, bits: Sequence[int | str], offload: bool, minimum_bytes: int = MIN_ALTERNATIVE_BYTES
    ) -> tuple[Alternative, ...]:
        if not isinstance(value, torch.Tensor) or not all(isinstance(s, int) for s in value.shape):
            return ()
        size = value.numel() * value.element_size()
        if size < minimum_bytes:
            return ()
        lossy_bits = bits if can_quantize(value) else ()
        found = [self._quantize(value, size, lifetime, b) for b in lossy_bits]
        if offload:
            found.append(self._offload(size, lifetime, None, 0.0, 0.0))
            for b in lossy_bits:
                quantized = quantized_bytes(value.numel(), b)
                kernels = self._quantize_ms(size, quantized)
                found.append(self._offload(quantized, lifetime, b, kernels, relative_squared_error(b), size))
        return tuple(found)

    def _quantize(self, value: torch.Tensor, size: int, lifetime: Lifetime, bits: int | str) -> Alternative:
        quantized = quantized_bytes(value.numel(), bits)
        intervals = ((lifetime.produced, lifetime.first_use, quantized), (lifetime.first_use, lifetime.last_use, size))
        return Alternative(QUANTIZE, bits, self._quantize_ms(size, quantized), intervals, relative_squared_error(bits))

    def _quantize_ms(self, size: int, quantized: int) -> float:
        """Quantize (read the tensor, write the copy) plus dequantize (the reverse)."""
        bandwidth = self._hardware.memory_bandwidth_bytes_per_s
        return 2 * ((size + quantized) / bandwidth * 1e3 + self._hardware.kernel_overhead_ms)

    def _offload(
        self, moved: int, lifetime: Lifetime, bits: int | str | None, kernel_ms: float, error: float, size: int | None = None
    ) -> Alternative:
        """Offload `moved` bytes (the tensor, or its quantized copy when `bits` is set)."""
        transfer_ms = moved / self._hardware.host_link_bytes_per_s * 1e3
        copied_at, out_exposed_ms = self._copy_done(lifetime.produced, transfer_ms)
        prefetch_at, in_exposed_ms = self._prefetch_start(lifetime.first_use, transfer_ms)
        full = size if size is not None else moved
        intervals = []
        if bits is not None:  # the quantized copy exists on the device until its copy ends
            intervals.append((lifetime.produced, copied_at, moved))
        elif copied_at > lifetime.free_at:
            intervals.append((lifetime.free_at + 1, copied_at, moved))
        if bits is not None:
            intervals += [(prefetch_at, lifetime.first_use, moved), (lifetime.first_use, lifetime.last_use, full)]
        else:
            intervals.append((prefetch_at, lifetime.last_use, moved))
        if self._hardware.device_type == "cpu":  # the host copy is this same memory
            intervals.append((lifetime.produced, lifetime.first_use, moved))
        kind = OFFLOAD if bits is None else OFFLOAD_QUANTIZED
        return Alternative(kind, bits, kernel_ms + out_exposed_ms + in_exposed_ms, tuple(intervals), error)

    def _copy_done(self, produced: int, transfer_ms: float) -> tuple[int, float]:
        """The forward step by which the copy started at `produced` ends, and the time not hidden."""
        for step in range(produced, self._num_forward):
            if self._cumulative[step + 1] - self._cumulative[produced] >= transfer_ms:
                return step, 0.0
        hidden = self._cumulative[self._num_forward] - self._cumulative[produced]
        return self._num_forward - 1, transfer_ms - hidden

    def _prefetch_start(self, first_use: int, transfer_ms: float) -> tuple[int, float]:
        """The latest backward step whose compute before `first_use` hides the copy.

        When the whole backward before it cannot, the copy starts at the first use and
        is exposed whole: started earlier it would hide only part of itself while holding
        the tensor all that time (``passes.hoist_prefetches`` places it alike).
        """
        for step in range(first_use - 1, self._num_forward - 1, -1):
            if self._cumulative[first_use] - self._cumulative[step] >= transfer_ms:
                return step, 0.0
        return first_use, transfer_ms
