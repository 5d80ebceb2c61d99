"""Per-group absmax quantization of a saved tensor, and its error model.

Format: the tensor is flattened, padded to a multiple of ``GROUP_SIZE`` elements and cut
into groups; each group keeps one float32 scale ``absmax / largest`` and its values
divided by it, so the group's largest magnitude maps to the format's largest value.

- int8, int4, int2 (``bits`` 8, 4, 2): values rounded to integers in ``[-qmax, qmax]``
  (``qmax = 2**(bits-1) - 1``). int8 codes are stored as they are; int4 and int2 codes
  are offset to ``[0, 2*qmax]`` and packed two or four to a uint8 with shifts.
- fp8 (``bits`` ``"fp8"``): values converted to ``float8_e4m3fn`` (largest 448), one
  byte each. It is a storage format here: the conversions run wherever torch converts
  dtypes (the CPU too), with no fp8 arithmetic.

Rounding is to nearest (ties to even), so dequantizing the same saved codes twice gives
the same tensor: a recomputation that reads a dequantized tensor is as deterministic as
one that reads a kept tensor.

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
FP8 = "fp8"  # float8_e4m3fn codes; the other widths are integer bit counts
FP8_DTYPE = torch.float8_e4m3fn
FP8_LARGEST = 448.0  # torch.finfo(FP8_DTYPE).max
FP8_MANTISSA_BITS = 3
SUPPORTED_BITS = (8, 4, 2, FP8)
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A group of zeros gets this scale instead of 0, so dividing by it stays finite.
SMALLEST_SCALE = 1e-30

Emit = Callable[..., Any]
Width = int | str  # 8, 4, 2 or FP8


def eager_emit(op: Any, *args: Any, **kwargs: Any) -> Any:
    """Run the op now: ``quantize(tensor, 8, eager_emit)`` quantizes a real tensor."""
    return op(*args, **kwargs)


def largest_code(bits: int) -> int:
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def quantized_bytes(numel: int, bits: Width) -> int:
    """Bytes of a quantized copy of ``numel`` elements: packed codes plus one scale per group."""
    _check_bits(bits)
    groups = math.ceil(numel / GROUP_SIZE)
    return groups * GROUP_SIZE * _bits_per_code(bits) // 8 + groups * SCALE_BYTES


def relative_squared_error(bits: Width) -> float:
    """Expected ``|x - dequantize(quantize(x))|² / |x|²`` for a tensor of roughly Gaussian values.

    Integers: rounding to a step ``Δ = absmax / qmax`` leaves an error uniform in
    ``±Δ/2``: ``Δ²/12`` per element. The largest of a group's ``G`` Gaussian values of
    variance ``σ²`` is about ``σ·sqrt(2 ln G)`` (the range estimate), so the error per
    element is ``σ²·2 ln G / (12 qmax²)`` and, relative to the mean square ``σ²``,
    independent of the tensor: about 5e-5 at int8, 0.017 at int4 and 0.8 at int2
    (G = 128). Heavy tails (a few outliers per group) make the real error larger,
    per-group scales keep it local.

    fp8 (e4m3fn): a scaled value ``v = m·2^e`` (mantissa ``m`` in ``[1, 2)``) is rounded
    to a step ``2^(e-3)`` (3 mantissa bits): an error uniform in ``±2^(e-4)``, mean
    square ``4^e·2^-6/12 = v²·2^-6/(12 m²)``. Summed over the tensor and divided by
    ``Σ v²`` that is ``2^-6/12 · E_w[1/m²]``, the mean of ``1/m²`` over values weighted
    by ``v²``. Values spread over several binades (a Gaussian spans many) have
    log-uniform mantissas, for which ``E[1/m²] = ∫₁² m⁻² dm / (m ln 2) = 3 / (8 ln 2)
    ≈ 0.54``: about 7.0e-4, 14 times int8's at the same bytes, 24 times below int4's.
    The scale only keeps values in range, so the error does not depend on ``G`` or on
    how far a group's largest value sits above the rest: an outlier that inflates an
    int8 group's step leaves fp8's relative error as it is (the model, Gaussian, does
    not see that). Values below e4m3fn's smallest normal (``2^-6``, 1/28672 of the
    group's largest) round on a fixed step and add nothing measurable.
    """
    if bits == FP8:
        return 2.0 ** (-2 * FP8_MANTISSA_BITS) / 12 * 3 / (8 * math.log(2))
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


def quantize(tensor: Any, bits: Width, numel: int, emit: Emit = eager_emit) -> tuple[Any, Any]:
    """``(codes, scales)`` of a contiguous tensor of ``numel`` elements."""
    _check_bits(bits)
    largest = FP8_LARGEST if bits == FP8 else float(largest_code(bits))
    padding = -numel % GROUP_SIZE
    flat = emit(aten.view.default, tensor, [numel])
    if padding:
        flat = emit(aten.constant_pad_nd.default, flat, [0, padding], 0.0)
    groups = emit(aten.view.default, flat, [-1, GROUP_SIZE])
    groups = emit(prims.convert_element_type.default, groups, SCALE_DTYPE)
    absmax = emit(aten.amax.default, emit(aten.abs.default, groups), [1], True)
    scales = emit(aten.div.Tensor, emit(aten.clamp_min.default, absmax, SMALLEST_SCALE), largest)
    scaled = emit(aten.div.Tensor, groups, scales)
    if bits != FP8:
        scaled = emit(aten.round.default, scaled)
    # The division can land a hair past the largest value: clamp rather than rely on how
    # a conversion treats out-of-range values (e4m3fn has no infinity).
    codes = emit(aten.clamp_max.default, emit(aten.clamp_min.default, scaled, -largest), largest)
    if bits == FP8:
        return emit(prims.convert_element_type.default, codes, FP8_DTYPE), scales
    if bits == 8:
        return emit(prims.convert_element_type.default, codes, torch.int8), scales
    offset = emit(prims.convert_element_type.default, emit(aten.add.Tensor, codes, largest), torch.uint8)
    per_byte = 8 // bits
    columns = emit(aten.view.default, offset, [-1, per_byte])
    packed = emit(aten.select.int, columns, 1, 0)
    for position in range(1, per_byte):
        column = emit(aten.select.int, columns, 1, position)
        shifted = emit(aten.bitwise_left_shift.Tensor_Scalar, column, bits * position)
        packed = emit(aten.bitwise_or.Tensor, packed, shifted)
    return packed, scales


def dequantize(
    codes: Any, scales: Any, bits: Width, shape: Sequence[int], dtype: torch.dtype, emit: Emit = eager_emit
) -> Any:
    """The tensor of ``shape`` and ``dtype`` that ``quantize`` saved as ``(codes, scales)``."""
    _check_bits(bits)
    numel = math.prod(shape)
    if bits in (8, FP8):  # one code per byte, as a number: converting restores its value
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
        values = emit(aten.sub.Tensor, offset, float(largest_code(bits)))
    groups = emit(aten.mul.Tensor, emit(aten.view.default, values, [-1, GROUP_SIZE]), scales)
    flat = emit(aten.view.default, groups, [-1])
    if flat_numel(numel) != numel:
        flat = emit(aten.slice.Tensor, flat, 0, 0, numel)
    restored = emit(aten.view.default, flat, list(shape))
    return emit(prims.convert_element_type.default, restored, dtype)


def flat_numel(numel: int) -> int:
    """Elements after padding to whole groups."""
    return math.ceil(numel / GROUP_SIZE) * GROUP_SIZE


def _bits_per_code(bits: Width) -> int:
    return 8 if bits == FP8 else bits


def _check_bits(bits: Width) -> None:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise ValueError(f"quantization to {bits} bits is not supported; choose one of {SUPPORTED_BITS}")
