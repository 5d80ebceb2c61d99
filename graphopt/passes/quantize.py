"""Per-group absmax quantization of a saved tensor, and its error model.

Format: the tensor is flattened, padded to a multiple of ``GROUP_SIZE`` elements and cut
into groups; each group keeps one float32 scale ``absmax / qmax`` and its values
rounded to integers in ``[-qmax, qmax]`` (``qmax = 2**(bits-1) - 1``). int8 codes are
stored as they are; int4 and int2 codes are offset to ``[0, 2*qmax]`` and packed two or
four to a uint8 with shifts. Rounding is to nearest (ties to even), so dequantizing the
same saved codes twice gives the same tensor: a recomputation that reads a dequantized
tensor is as deterministic as one that reads a kept tensor.

``quantize`` and ``dequantize`` are written once, over aten ops passed through an
``emit(op, *args, **kwargs)`` function: called with real tensors they compute (tests
check the numerics that way); called by ``lower_saves`` they add the same ops as nodes
of the joint graph, which Inductor fuses into a few kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

aten = torch.ops.aten
prims = torch.ops.prims  # dtype conversion as Inductor's decomposed graphs spell it

GROUP_SIZE = 128
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4
SUPPORTED_BITS = (8, 4, 2)
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A group of zeros gets this scale instead of 0, so dividing by it stays finite.
SMALLEST_SCALE = 1e-30

Emit = Callable[..., Any]


def eager_emit(op: Any, *args: Any, **kwargs: Any) -> Any:
    """Run the op now: ``quantize(tensor, 8, eager_emit)`` quantizes a real tensor."""
    return op(*args, **kwargs)


def largest_code(bits: int) -> int:
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def quantized_bytes(numel: int, bits: int) -> int:
    """Bytes of a quantized copy of ``numel`` elements: packed codes plus one scale per group."""
    _check_bits(bits)
    groups = math.ceil(numel / GROUP_SIZE)
    return groups * GROUP_SIZE * bits // 8 + groups * SCALE_BYTES


def relative_squared_error(bits: int) -> float:
    """Expected ``|x - dequantize(quantize(x))|² / |x|²`` for a tensor of roughly Gaussian values.

    Rounding to a step ``Δ = absmax / qmax`` leaves an error uniform in ``±Δ/2``:
    ``Δ²/12`` per element. The largest of a group's ``G`` Gaussian values of variance
    ``σ²`` is about ``σ·sqrt(2 ln G)`` (the range estimate), so the error per element is
    ``σ²·2 ln G / (12 qmax²)`` and, relative to the mean square ``σ²``, independent of
    the tensor: about 5e-5 at int8, 0.017 at int4 and 0.8 at int2 (G = 128). Heavy
    tails (a few outliers per group) make the real error larger, per-group scales keep
    it local.
    """
    return 2 * math.log(GROUP_SIZE) / (12 * largest_code(bits) ** 2)


def can_quantize(value: object) -> bool:
    """Whether a tensor value can be saved quantized: a floating, contiguous, statically sized tensor."""
    return (
        isinstance(value, torch.Tensor)
        and value.dtype in QUANTIZABLE_DTYPES
        and all(isinstance(size, int) for size in value.shape)
        and value.numel() > 0
        and value.is_contiguous()
    )


def quantize(tensor: Any, bits: int, numel: int, emit: Emit = eager_emit) -> tuple[Any, Any]:
    """``(codes, scales)`` of a contiguous tensor of ``numel`` elements."""
    qmax = largest_code(bits)
    padding = -numel % GROUP_SIZE
    flat = emit(aten.view.default, tensor, [numel])
    if padding:
        flat = emit(aten.constant_pad_nd.default, flat, [0, padding], 0.0)
    groups = emit(aten.view.default, flat, [-1, GROUP_SIZE])
    groups = emit(prims.convert_element_type.default, groups, SCALE_DTYPE)
    absmax = emit(aten.amax.default, emit(aten.abs.default, groups), [1], True)
    scales = emit(aten.div.Tensor, emit(aten.clamp_min.default, absmax, SMALLEST_SCALE), float(qmax))
    rounded = emit(aten.round.default, emit(aten.div.Tensor, groups, scales))
    codes = emit(aten.clamp_max.default, emit(aten.clamp_min.default, rounded, float(-qmax)), float(qmax))
    if bits == 8:
        return emit(prims.convert_element_type.default, codes, torch.int8), scales
    offset = emit(prims.convert_element_type.default, emit(aten.add.Tensor, codes, float(qmax)), torch.uint8)
    per_byte = 8 // bits
    columns = emit(aten.view.default, offset, [-1, per_byte])
    packed = emit(aten.select.int, columns, 1, 0)
    for position in range(1, per_byte):
        column = emit(aten.select.int, columns, 1, position)
        shifted = emit(aten.bitwise_left_shift.Tensor_Scalar, column, bits * position)
        packed = emit(aten.bitwise_or.Tensor, packed, shifted)
    return packed, scales


def dequantize(
    codes: Any, scales: Any, bits: int, shape: Sequence[int], dtype: torch.dtype, emit: Emit = eager_emit
) -> Any:
    """The tensor of ``shape`` and ``dtype`` that ``quantize`` saved as ``(codes, scales)``."""
    qmax = largest_code(bits)
    numel = math.prod(shape)
    if bits == 8:
        values = emit(prims.convert_element_type.default, codes, SCALE_DTYPE)
    else:
        mask = 2**bits - 1
        columns = [
            emit(aten.bitwise_and.Scalar, emit(aten.bitwise_right_shift.Tensor_Scalar, codes, bits * position), mask)
            if position
            else emit(aten.bitwise_and.Scalar, codes, mask)
            for position in range(8 // bits)
        ]
        columns = [emit(aten.unsqueeze.default, column, 1) for column in columns]
        offset = emit(prims.convert_element_type.default, emit(aten.cat.default, columns, 1), SCALE_DTYPE)
        values = emit(aten.sub.Tensor, offset, float(qmax))
    groups = emit(aten.mul.Tensor, emit(aten.view.default, values, [-1, GROUP_SIZE]), scales)
    flat = emit(aten.view.default, groups, [-1])
    if flat_numel(numel) != numel:
        flat = emit(aten.slice.Tensor, flat, 0, 0, numel)
    restored = emit(aten.view.default, flat, list(shape))
    return emit(prims.convert_element_type.default, restored, dtype)


def flat_numel(numel: int) -> int:
    """Elements after padding to whole groups."""
    return math.ceil(numel / GROUP_SIZE) * GROUP_SIZE


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization to {bits} bits is not supported; choose one of {SUPPORTED_BITS}")
