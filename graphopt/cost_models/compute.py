"""How long one FX node takes to run: a roofline estimate, or a timing on the real device.

The optimizer weighs "recompute this tensor" against memory, so it needs each op's time in
milliseconds. The roofline reads FLOPs (torch's own flop formulas) and bytes moved from
the FakeTensor metadata that tracing leaves in ``node.meta["val"]``; it never runs
anything. ``MeasuredCostModel`` runs each distinct op once per shape on the device and
remembers the result on disk, for when estimates are not good enough.
"""

from __future__ import annotations

import json
import operator
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from .. import torch_private
from ..errors import HardwareError
from ..ops.fsdp import COLLECTIVES as FSDP_COLLECTIVES
from .hardware import HardwareProfile

MS_PER_S = 1e3
DEFAULT_CACHE_PATH = os.path.join("~", ".cache", "graphopt", "op_times.json")
CACHE_FORMAT_VERSION = 1

_aten = torch.ops.aten
# Ops that only make a new tensor header over existing storage: no kernel touches data.
_METADATA_ONLY_OPS = frozenset({
    _aten.view, _aten._unsafe_view, _aten.t, _aten.transpose, _aten.permute, _aten.expand,
    _aten.slice, _aten.select, _aten.squeeze, _aten.unsqueeze, _aten.alias, _aten.as_strided,
    _aten.detach, _aten.view_as, _aten.unflatten, _aten.split, _aten.split_with_sizes,
    _aten.unbind, _aten.chunk, _aten.narrow, _aten.diagonal, _aten.numpy_T, _aten.mT,
})
# reshape is a view when the strides allow it and a copy otherwise; the metadata says which.
_MAYBE_VIEW_OPS = frozenset({_aten.reshape, _aten.flatten, _aten.contiguous})


def _cpu_attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any, **__: Any
) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# FLOP formulas torch's registry lacks. Without them CPU flash attention costs nothing on
# the roofline, and recomputing an attention output (two batched matmuls) looked free:
# a bench GPT plan that did so four times measured 11% slower than torch's min-cut.
_EXTRA_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


@dataclass(frozen=True)
class OpCost:
    """What one op costs: work done, DRAM traffic, and the resulting time; `assumption`
    says what the estimate assumed where it could not know (None: nothing)."""

    flops: float
    bytes_moved: float
    ms: float
    assumption: str | None = None


def _concrete(value: Any) -> Any:
    """A SymInt/SymFloat as its hint (the size seen at trace time); other values unchanged."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        hint = getattr(value.node, "hint", None)
        return hint if hint is not None else value
    return value


def _meta_value(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _input_values(node: fx.Node) -> tuple[tuple, dict]:
    """The node's args and kwargs with every input node replaced by its traced value."""
    return torch_private.map_nested(_meta_value, (tuple(node.args), dict(node.kwargs)))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in torch_private.nested_leaves(value) if isinstance(leaf, torch.Tensor))


# Namespaces whose ops without a FLOP formula do no arithmetic worth counting: aten's
# compute-heavy ops (matmuls, convolutions, attention) have formulas, the rest are
# pointwise, reductions, copies and indexing, which the roofline prices by the bytes
# they move; graphopt's own ops copy and convert.
MEMORY_BOUND_NAMESPACES = frozenset({"aten", "prims", "graphopt"})


def node_flops(node: fx.Node) -> float:
    """FLOPs of an aten call by torch's flop formulas (and ours for ops torch has none for:
    CPU attention); 0 for ops without one, or whose formula fails (`flop_count` says which)."""
    return flop_count(node)[0]


def flop_count(node: fx.Node) -> tuple[float, str | None]:
    """FLOPs of a node, and why they are unknown where that matters: its formula failed,
    or an op outside `MEMORY_BOUND_NAMESPACES` (a custom op) that makes a tensor has none."""
    packet = torch_private.overload_packet(node)
    formula = flop_registry.get(packet) or _EXTRA_FLOP_FORMULAS.get(packet)
    if formula is None:
        return 0.0, _missing_formula(node)
    args, kwargs = _input_values(node)
    try:
        flops = formula(*args, **kwargs, out_val=node.meta.get("val"))
    except Exception as error:  # noqa: BLE001 - a formula that cannot read these metas must not stop planning
        return 0.0, f"its FLOP formula failed ({type(error).__name__})"
    flops = _concrete(flops)
    if not isinstance(flops, (int, float)):
        return 0.0, "its FLOP formula gave no number (symbolic sizes)"
    return float(flops), None


def _missing_formula(node: fx.Node) -> str | None:
    """Why a node without a FLOP formula is an unknown, or None where none is needed."""
    if node.op != "call_function" or node.target is operator.getitem:
        return None
    if getattr(node.target, "namespace", None) in MEMORY_BOUND_NAMESPACES:
        return None
    if next(_tensors(node.meta.get("val")), None) is None:
        return None  # arithmetic on sizes
    return "has no FLOP formula"


def _tensor_bytes(tensor: torch.Tensor) -> float:
    """DRAM bytes a kernel touches in a tensor: its elements, or less when strides repeat them."""
    numel = _concrete(tensor.numel())
    if not isinstance(numel, int) or numel == 0:
        return 0.0
    sizes = [_concrete(size) for size in tensor.shape]
    strides = [_concrete(stride) for stride in tensor.stride()]
    if not all(isinstance(item, int) for item in sizes + strides):
        return float(numel * tensor.element_size())
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(sizes, strides))
    return float(min(numel, extent) * tensor.element_size())


def _is_view(node: fx.Node, packet: Any) -> bool:
    if node.target is operator.getitem or packet in _METADATA_ONLY_OPS:
        return True
    if packet not in _MAYBE_VIEW_OPS:
        return False
    out = node.meta.get("val")
    source = _meta_value(node.args[0]) if node.args else None
    if not isinstance(out, torch.Tensor) or not isinstance(source, torch.Tensor):
        return False
    return out.untyped_storage() is source.untyped_storage()


def node_bytes_moved(node: fx.Node) -> float:
    """Bytes read from tensor inputs plus bytes written to outputs; 0 for views and getitem.

    An input node used twice (``x * x``) is read once: the second read hits cache.
    """
    packet = torch_private.overload_packet(node)
    if node.op != "call_function" or _is_view(node, packet):
        return 0.0
    input_nodes = {arg: None for arg in torch_private.nested_leaves((node.args, node.kwargs)) if isinstance(arg, fx.Node)}
    read_bytes = sum(_tensor_bytes(tensor) for arg in input_nodes for tensor in _tensors(arg.meta.get("val")))
    written_bytes = sum(_tensor_bytes(tensor) for tensor in _tensors(node.meta.get("val")))
    return float(read_bytes + written_bytes)


def roofline_ms(flops: float, bytes_moved: float, dtype: torch.dtype, hardware: HardwareProfile) -> float:
    """Time of an op bound by either compute or memory, plus the launch cost if it does anything."""
    if flops <= 0 and bytes_moved <= 0:
        return 0.0
    compute_s = flops / hardware.flops_per_s(dtype)
    memory_s = bytes_moved / hardware.memory_bandwidth_bytes_per_s
    return max(compute_s, memory_s) * MS_PER_S + hardware.kernel_overhead_ms


def node_dtype(node: fx.Node) -> torch.dtype:
    """The dtype that sets an op's speed: its first floating input, else its output."""
    args, kwargs = _input_values(node)
    for tensor in _tensors((args, kwargs)):
        if tensor.dtype.is_floating_point:
            return tensor.dtype
    for tensor in _tensors(node.meta.get("val")):
        return tensor.dtype
    return torch.float32


def estimate_node_cost(node: fx.Node, hardware: HardwareProfile) -> OpCost:
    """Roofline cost of one node from its traced metadata; never runs the op.

    An op whose FLOPs are unknown (`flop_count`) is priced by the bytes it moves at memory
    bandwidth, and at least one kernel launch, never as free; `assumption` says so.
    FSDP2's collectives in a graph planned for one rank (``graphopt plan --fsdp``) cost
    the plan nothing: FSDP2 issues them whatever it decides.
    """
    if node.target in FSDP_COLLECTIVES:
        return OpCost(flops=0.0, bytes_moved=0.0, ms=0.0)
    flops, unknown = flop_count(node)
    bytes_moved = node_bytes_moved(node)
    ms = roofline_ms(flops, bytes_moved, node_dtype(node), hardware)
    if unknown is None:
        return OpCost(flops=flops, bytes_moved=bytes_moved, ms=ms)
    return OpCost(
        flops=flops,
        bytes_moved=bytes_moved,
        ms=max(ms, hardware.kernel_overhead_ms),
        assumption=f"{node.target} {unknown}: priced by the bytes it moves at memory bandwidth, as if it did no arithmetic",
    )


class _CannotBuildInputs(Exception):
    """The node's inputs have no concrete metadata to build real tensors from."""


class MeasuredCostModel:
    """Times each distinct (op, input shapes, dtypes, device) once on the real device.

    Timings persist as JSON so a second run, or a second model with the same ops, pays
    nothing. Ops it cannot run on random inputs (or that are views) get the roofline
    estimate instead.
    """

    def __init__(self, hardware: HardwareProfile, cache_path: str | None = None, repeats: int = 5):
        self.hardware = hardware
        self.cache_path = os.path.expanduser(cache_path or DEFAULT_CACHE_PATH)
        self.repeats = max(1, repeats)
        self.device = torch.device(hardware.device_type)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise HardwareError(
                f"MeasuredCostModel for {hardware.name!r} needs a CUDA device and none is visible; "
                "use estimate_node_cost, or measure on the machine you will train on"
            )
        self._device_name = _device_name(self.device)
        self._ms_by_key: dict[str, float] = _load_cache(self.cache_path)

    def node_cost(self, node: fx.Node) -> OpCost:
        estimate = estimate_node_cost(node, self.hardware)
        packet = torch_private.overload_packet(node)
        if packet is None or _is_view(node, packet):
            return estimate
        key = self._cache_key(node)
        if key is None:
            return estimate
        if key not in self._ms_by_key:
            measured_ms = self._time_node(node)
            if measured_ms is None:
                return estimate
            self._ms_by_key[key] = measured_ms
            _save_cache(self.cache_path, self._ms_by_key)
        return OpCost(flops=estimate.flops, bytes_moved=estimate.bytes_moved, ms=self._ms_by_key[key])

    def _cache_key(self, node: fx.Node) -> str | None:
        args, kwargs = _input_values(node)
        try:
            described = torch_private.map_nested(_describe, (args, kwargs))
        except _CannotBuildInputs:
            return None
        return json.dumps([str(node.target), described, self._device_name], default=str)

    def _time_node(self, node: fx.Node) -> float | None:
        generator = torch.Generator(self.device).manual_seed(0)  # leaves the global RNG alone
        args, kwargs = _input_values(node)
        try:
            index_bound = _index_bound(args, kwargs)
            real_args, real_kwargs = torch_private.map_nested(
                lambda value: _real_value(value, self.device, generator, index_bound), (args, kwargs)
            )
            with torch.no_grad():
                node.target(*real_args, **real_kwargs)  # warm-up: allocator, autotuning, caches
                times_ms = [self._timed_run(node.target, real_args, real_kwargs) for _ in range(self.repeats)]
        except Exception:  # noqa: BLE001 - symbolic sizes, or random inputs the op rejects (bad indices)
            return None
        return statistics.median(times_ms)

    def _timed_run(self, target: Any, args: tuple, kwargs: dict) -> float:
        self._synchronize()
        start_s = time.perf_counter()
        target(*args, **kwargs)
        self._synchronize()
        return (time.perf_counter() - start_s) * MS_PER_S

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _describe(value: Any) -> Any:
    """A JSON-able description of one input: a tensor's shape and dtype, or a plain value."""
    if isinstance(value, torch.Tensor):
        return {"shape": [_int_or_raise(size) for size in value.shape], "dtype": str(value.dtype)}
    value = _concrete(value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise _CannotBuildInputs(value)
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def _int_or_raise(size: Any) -> int:
    size = _concrete(size)
    if not isinstance(size, int):
        raise _CannotBuildInputs(size)
    return size


def _index_bound(args: tuple, kwargs: dict) -> int:
    """An exclusive bound for random integer inputs that is a valid index into every dim.

    Index-like ops (embedding, gather, index_select) index some floating input's dim; the
    smallest dim of all floating inputs is in range for any of them.
    """
    dims = [
        _int_or_raise(size)
        for tensor in _tensors((args, kwargs)) if tensor.dtype.is_floating_point
        for size in tensor.shape
    ]
    positive_dims = [dim for dim in dims if dim > 0]
    return min(positive_dims) if positive_dims else 1


def _real_value(value: Any, device: torch.device, generator: torch.Generator, index_bound: int) -> Any:
    if not isinstance(value, torch.Tensor):
        return _concrete(value)
    shape = [_int_or_raise(size) for size in value.shape]
    if value.dtype.is_floating_point or value.dtype.is_complex:
        return torch.randn(shape, dtype=value.dtype, device=device, generator=generator)
    if value.dtype == torch.bool:
        return torch.randint(0, 2, shape, device=device, generator=generator).bool()
    return torch.randint(0, index_bound, shape, dtype=value.dtype, device=device, generator=generator)


def _device_name(device: torch.device) -> str:
    """Names the silicon and, on CPU, the thread count: both change op times."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model_name()} x{torch.get_num_threads()} threads"


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _load_cache(cache_path: str) -> dict[str, float]:
    """Saved timings; an unreadable or older-format cache is ignored, since it only saves time."""
    if not os.path.exists(cache_path):
        return {}
    try:
        with open(cache_path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        warnings.warn(f"ignoring unreadable op-time cache {cache_path}: {error}", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_FORMAT_VERSION:
        return {}
    entries = data.get("ms_by_key", {})
    return {key: float(ms) for key, ms in entries.items() if isinstance(ms, (int, float))}


def _save_cache(cache_path: str, ms_by_key: dict[str, float]) -> None:
    """Write atomically, so a crash or a concurrent run never leaves half a file."""
    directory = os.path.dirname(cache_path) or "."
    os.makedirs(directory, exist_ok=True)
    temporary_path = f"{cache_path}.{os.getpid()}.tmp"
    with open(temporary_path, "w", encoding="utf-8") as file:
        json.dump({"version": CACHE_FORMAT_VERSION, "ms_by_key": ms_by_key}, file, indent=0, sort_keys=True)
    os.replace(temporary_path, cache_path)
