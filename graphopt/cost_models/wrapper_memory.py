"""Device memory over time, read from the wrapper code Inductor generated for a graph.

Inductor's Python wrapper is a straight-line function ``call(args)`` that allocates
every buffer (``bufN = empty_strided_cpu(sizes, strides, dtype)``), calls kernels,
aliases buffers (``reinterpret_tensor``, ``bufM = bufN; del bufN  # reuse``), binds the
outputs of multi-output extern kernels (``bufM = bufN[0]``) and frees each buffer with
``del`` after its last use. Replaying those statements gives the bytes the graph holds
after each of them: Inductor's own fusion, in-place and buffer-reuse decisions, not a
model of them. The replay reads the source text only; sizes it cannot read from an
allocation (what an extern kernel allocates itself) come from `buffer_bytes`, which the
caller takes from Inductor's buffers (``torch_private.generate_wrapper_code``).

What no wrapper line shows is memory an extern kernel takes for itself while it runs.
``EXTERN_SCRATCH`` gives it per op, held for the statement that calls the op. oneDNN's
CPU convolutions pick their algorithm, and with it their scratch, by the machine's
instruction set and torch's thread count: when the graph is planned for the CPU it runs
on (``probe``), each distinct call is measured once per process by running it on zero
tensors of the call's layouts (``_probed_scratch``); otherwise, or where a call's layouts
are unknown, a rule measured on one machine (tests/test_wrapper_memory.py) stands in.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping

import torch

_ALIASING_CALLS = {"reinterpret_tensor", "as_strided", "view", "reshape", "expand", "permute", "squeeze", "unsqueeze"}


class WrapperParseError(ValueError):
    """The wrapper code does not have the shape the replay reads."""


@dataclasses.dataclass
class _Storage:
    """One allocation, alive while any name or tuple refers to it."""

    bytes: int
    references: int = 0


def _flash_attention_backward_scratch(replay: _Replay, call: ast.Call) -> int:
    """CPU flash attention's backward copies its output gradient (argument 0, shaped
    batch x heads x sequence x width) unless that is laid out batch, sequence, heads,
    width in memory: measured, one more allocation of the gradient's size (798,720
    bytes at 16 x 3 x 65 x 64 floats) for a gradient in any other order, none otherwise."""
    if not call.args:
        return 0
    shape, strides = replay.shape(call.args[0]), replay.strides(call.args[0])
    if shape is None or strides is None or len(shape) != 4:
        return 0
    batch, heads, sequence, width = shape
    expected = (sequence * heads * width, width, heads * width, 1)
    if all(size == 1 or stride == want for size, stride, want in zip(shape, strides, expected)):
        return 0
    return replay.bytes_of(call.args[0])


def _convolution_scratch(replay: _Replay, call: ast.Call) -> int:
    """oneDNN's CPU convolution: what the call allocates beyond its output, measured here
    (``_probed_scratch``). Where it is not run, the rule from one thread of an AVX2
    machine: the weight (argument 1) reordered into oneDNN's blocked layout, its bytes
    plus 12,336 for a 3x3, 1x1 or 7x7 kernel at any channel count."""
    probed = _probed_scratch(replay, call)
    if probed is not None:
        return probed
    return replay.bytes_of(call.args[1]) + 12_336 if len(call.args) > 1 else 0


def _convolution_backward_scratch(replay: _Replay, call: ast.Call) -> int:
    """oneDNN's CPU convolution backward (gradient, input, weight, ...), measured as
    `_convolution_scratch` is. The rule from one thread of an AVX2 machine: the weight
    reordered and the weight's gradient in the blocked layout, twice the weight's bytes
    (1,179,648 for a 128 x 128 x 3 x 3 float weight); on two threads, a 1x1 stride-2
    backward held 106,752 bytes for a 32,768-byte weight."""
    probed = _probed_scratch(replay, call)
    if probed is not None:
        return probed
    return 2 * replay.bytes_of(call.args[2]) if len(call.args) > 2 else 0


# (op, its arguments' layouts and constants, torch's threads) -> the bytes it allocated
# beyond its outputs.
_PROBES: dict[tuple, int] = {}


class _NotRunnable(ValueError):
    """An argument of an extern call that the replay cannot make a tensor or constant of."""


def _probed_scratch(replay: _Replay, call: ast.Call) -> int | None:
    """What the aten op a wrapper statement calls allocates beyond its outputs, measured
    with torch's CPU allocator by running it once here on zero tensors of the call's
    shapes, strides and dtypes, at torch's present thread count (oneDNN's scratch is per
    thread): the most of a first and a second call (oneDNN creates its primitive on the
    first). None where the replay may not run ops (a graph planned for another machine),
    an argument is not a tensor of known layout or a literal (a symbolic size), or the op
    fails on the probe's inputs."""
    from .. import torch_private

    if not replay.probe:
        return None
    op = getattr(torch.ops.aten, _op_name(call), None)
    if op is None:
        return None
    with torch_private.real_tensors():  # planning runs inside the compile's fake mode
        try:
            args = [replay.runnable(argument) for argument in call.args]
            kwargs = {keyword.arg: replay.runnable(keyword.value) for keyword in call.keywords if keyword.arg}
        except _NotRunnable:
            return None
        key = (_op_name(call), _layouts(args), _layouts(kwargs), torch.get_num_threads())
        if key not in _PROBES:
            peaks = []
            try:
                for _ in range(2):
                    result, peak = torch_private.cpu_allocated_peak(lambda: op.default(*args, **kwargs))
                    peaks.append(peak - _output_bytes(result))
            except (RuntimeError, TypeError, ValueError):
                return None
            _PROBES[key] = max(0, *peaks)
    return _PROBES[key]


def _layouts(value: object) -> object:
    """A hashable description of probe arguments: tensors by layout, the rest as given."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, dict):
        return tuple(sorted((name, _layouts(element)) for name, element in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_layouts(element) for element in value)
    return value


def _output_bytes(result: object) -> int:
    """Bytes of the distinct storages among an op's outputs."""
    tensors = [result] if isinstance(result, torch.Tensor) else [t for t in result if isinstance(t, torch.Tensor)]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


# Per device type, extern ops (by the name the wrapper calls) -> the bytes they allocate
# for themselves while they run.
EXTERN_SCRATCH = {
    "cpu": {
        "_scaled_dot_product_flash_attention_for_cpu_backward": _flash_attention_backward_scratch,
        "convolution": _convolution_scratch,
        "convolution_backward": _convolution_backward_scratch,
    },
}


class _Replay:
    def __init__(
        self,
        buffer_bytes: Mapping[str, int],
        input_storage: Mapping[str, object],
        strides: Mapping[str, tuple] | None = None,
        shapes: Mapping[str, tuple] | None = None,
        device_type: str = "cpu",
        dtypes: Mapping[str, torch.dtype] | None = None,
        probe: bool = False,
    ):
        self._scratch_rules = EXTERN_SCRATCH.get(device_type, {})
        self.probe = probe  # whether extern calls may be run here to measure their scratch
        self._buffer_bytes = buffer_bytes
        self._input_storage = input_storage
        self._strides = strides or {}
        self._shapes = shapes or {}
        self._dtypes = dtypes or {}
        # Multi-output kernels' results -> {position: the name each output is bound to}.
        self.elements: dict[str, dict[int, str]] = {}
        self._names: dict[str, _Storage | tuple[_Storage | None, ...] | list] = {}
        self._tuples: dict[str, list[_Storage | None]] = {}
        self.live = 0
        self.timeline: list[int] = []

    # -- references
    def _hold(self, storage: _Storage) -> None:
        if storage.references == 0:
            self.live += storage.bytes
        storage.references += 1

    def _release(self, storage: _Storage) -> None:
        storage.references -= 1
        if storage.references == 0:
            self.live -= storage.bytes

    def _bind(self, name: str, value: object) -> None:
        self._unbind(name)
        if isinstance(value, _Storage):
            self._hold(value)
        elif isinstance(value, list):  # a multi-output extern kernel's result
            for element in value:
                if element is not None:
                    self._hold(element)
        self._names[name] = value

    def _unbind(self, name: str) -> None:
        value = self._names.pop(name, None)
        if isinstance(value, _Storage):
            self._release(value)
        elif isinstance(value, list):
            for element in value:
                if element is not None:
                    self._release(element)

    # -- statements
    def inputs(self, names: list[str]) -> None:
        shared: dict[object, _Storage] = {}
        for name in names:
            key = self._input_storage.get(name)
            if key is None:  # someone else's memory (parameters, the batch): not counted
                self._names[name] = _Storage(0)
                continue
            storage = shared.setdefault(key, _Storage(self._buffer_bytes.get(name, 0)))
            self._bind(name, storage)

    def assign(self, name: str, value: ast.expr) -> None:
        self._bind(name, self._evaluate(name, value))

    def delete(self, name: str) -> None:
        self._unbind(name)

    def _evaluate(self, name: str, value: ast.expr) -> object:
        if isinstance(value, ast.Name):
            return self._names.get(value.id, _Storage(0))
        if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name):
            return self._element(value.value.id, value.slice, name)
        if isinstance(value, ast.Call):
            function = _call_name(value.func)
            if function.startswith("empty_strided"):
                return _Storage(_allocation_bytes(value) if _literal(value) else self._buffer_bytes.get(name, 0))
            if function in _ALIASING_CALLS and value.args and isinstance(value.args[0], ast.Name):
                return self._names.get(value.args[0].id, _Storage(0))
            if isinstance(value.func, ast.Attribute) and function in _ALIASING_CALLS and isinstance(value.func.value, ast.Name):
                return self._names.get(value.func.value.id, _Storage(0))
            if name in self._buffer_bytes:  # an extern kernel allocating its output
                return _Storage(self._buffer_bytes[name])
            # A multi-output kernel allocates all its outputs as it runs; the wrapper binds
            # them to names in the statements after it.
            outputs: list[_Storage | None] = []
            for position, bound in sorted(self.elements.get(name, {}).items()):
                outputs.extend([None] * (position + 1 - len(outputs)))
                outputs[position] = _Storage(self._buffer_bytes.get(bound, 0))
            return outputs
        return _Storage(0)  # a scalar, a stream, a constant

    def _element(self, source: str, index: ast.expr, name: str) -> object:
        value = self._names.get(source)
        if not isinstance(value, list):
            return value if isinstance(value, _Storage) else _Storage(0)
        try:
            position = ast.literal_eval(index)
        except ValueError:
            return _Storage(0)
        if not isinstance(position, int):
            return _Storage(0)
        while len(value) <= position:
            value.append(None)
        if value[position] is None:  # first bound: the extern kernel allocated it
            storage = _Storage(self._buffer_bytes.get(name, 0))
            value[position] = storage
            self._hold(storage)  # the tuple holds it until the tuple is deleted
        return value[position]

    def record(self, scratch: int = 0) -> None:
        self.timeline.append(self.live + scratch)

    def strides(self, expression: ast.expr) -> tuple | None:
        """The strides of a tensor argument: a name's from Inductor's buffers, a
        ``reinterpret_tensor``'s from the call."""
        return self._layout(expression, self._strides, 2)

    def shape(self, expression: ast.expr) -> tuple | None:
        """The sizes of a tensor argument, as `strides` finds them."""
        return self._layout(expression, self._shapes, 1)

    @staticmethod
    def _layout(expression: ast.expr, table: Mapping[str, tuple], position: int) -> tuple | None:
        if isinstance(expression, ast.Name):
            return table.get(expression.id)
        if isinstance(expression, ast.Call) and _call_name(expression.func) == "reinterpret_tensor" and len(expression.args) > 2:
            try:
                return tuple(ast.literal_eval(expression.args[position]))
            except ValueError:
                return None
        return None

    def runnable(self, expression: ast.expr) -> object:
        """An argument of an extern call made real: a zero tensor of a tensor argument's
        shape, strides and dtype, or a literal constant (raises ``_NotRunnable``)."""
        shape, strides = self.shape(expression), self.strides(expression)
        if shape is not None and strides is not None:
            name = expression.id if isinstance(expression, ast.Name) else getattr(expression.args[0], "id", None)
            dtype = self._dtypes.get(name) if name is not None else None
            if dtype is None:
                raise _NotRunnable(ast.unparse(expression))
            return torch.zeros(storage_bytes(shape, strides, dtype) // _element_size(dtype), dtype=dtype).as_strided(shape, strides)
        try:
            return ast.literal_eval(expression)
        except (ValueError, SyntaxError):
            raise _NotRunnable(ast.unparse(expression)) from None

    def bytes_of(self, expression: ast.expr) -> int:
        """Bytes of a tensor argument's view (a name's whole buffer)."""
        if isinstance(expression, ast.Name):
            return self._buffer_bytes.get(expression.id, 0)
        if isinstance(expression, ast.Call) and _call_name(expression.func) == "reinterpret_tensor" and isinstance(expression.args[0], ast.Name):
            return self._buffer_bytes.get(expression.args[0].id, 0)
        return 0

    def scratch(self, statement: ast.stmt) -> int:
        """Bytes an extern op the statement calls holds for itself while it runs."""
        value = statement.value if isinstance(statement, (ast.Assign, ast.Expr)) else None
        if not isinstance(value, ast.Call):
            return 0
        rule = self._scratch_rules.get(_op_name(value))
        return rule(self, value) if rule is not None else 0


def wrapper_timeline(
    source: str,
    buffer_bytes: Mapping[str, int],
    input_storage: Mapping[str, object],
    strides: Mapping[str, tuple] | None = None,
    shapes: Mapping[str, tuple] | None = None,
    device_type: str = "cpu",
    dtypes: Mapping[str, torch.dtype] | None = None,
    probe: bool = False,
) -> list[int]:
    """Bytes the graph holds after each statement of the wrapper's ``call``.

    `buffer_bytes` gives the storage bytes of Inductor's buffers and of the graph's
    inputs by name; `input_storage` names the inputs the graph owns (the backward's
    saved tensors and tangents), mapped to a storage key (inputs sharing one are one
    allocation). Other inputs are someone else's memory and not counted; the graph's
    outputs live on past its end. `strides`, `shapes` and `dtypes` (by name, as
    `buffer_bytes`) let the extern scratch rules tell layouts apart and run a call's op on
    tensors of its arguments' layouts; `device_type` picks the rules; `probe` lets them
    run extern calls here (only for a graph planned for the machine planning it).
    """
    body = _call_body(source)
    replay = _Replay(buffer_bytes, input_storage, strides, shapes, device_type, dtypes, probe)
    for statement in _flatten(body):
        value = statement.value if isinstance(statement, ast.Assign) and len(statement.targets) == 1 else None
        if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) and isinstance(statement.targets[0], ast.Name):
            try:
                position = ast.literal_eval(value.slice)
            except ValueError:
                continue
            if isinstance(position, int):
                replay.elements.setdefault(value.value.id, {})[position] = statement.targets[0].id
    for statement in _flatten(body):
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Tuple) and isinstance(statement.value, ast.Name) and statement.value.id == "args":
                replay.inputs([element.id for element in target.elts if isinstance(element, ast.Name)])
            elif isinstance(target, ast.Name):
                replay.assign(target.id, statement.value)
        elif isinstance(statement, ast.Delete):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    replay.delete(target.id)
        elif isinstance(statement, ast.Return):
            replay.record()
            break
        replay.record(replay.scratch(statement))
    return replay.timeline


def returned_names(source: str) -> list[str | None]:
    """The buffer each output of the wrapper's ``call`` is, by position: a returned name,
    or the name a returned ``reinterpret_tensor`` views; None for anything else."""
    return [name for name, _ in _returned(source)]


def returned_strides(source: str, strides: Mapping[str, tuple]) -> list[tuple | None]:
    """The strides each output of the wrapper's ``call`` has, by position: a returned
    buffer's (from `strides`, by name) or a returned ``reinterpret_tensor``'s own."""
    return [stride if stride is not None else strides.get(name) for name, stride in _returned(source)]


def _returned(source: str) -> list[tuple[str | None, tuple | None]]:
    """Per output of ``call``: the buffer it is (or views), and the strides a view gives it."""
    for statement in _flatten(_call_body(source)):
        if isinstance(statement, ast.Return) and isinstance(statement.value, (ast.Tuple, ast.List)):
            outputs: list[tuple[str | None, tuple | None]] = []
            for element in statement.value.elts:
                stride = None
                if isinstance(element, ast.Call) and _call_name(element.func) in _ALIASING_CALLS and element.args:
                    stride = _Replay._layout(element, {}, 2)
                    element = element.args[0]
                outputs.append((element.id if isinstance(element, ast.Name) else None, stride))
            return outputs
    return []


def _call_body(source: str) -> list[ast.stmt]:
    """The statements of the wrapper's ``call`` (a function or a method of the runner)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "call":
            return node.body
    raise WrapperParseError("the wrapper code has no call() function")


def _flatten(statements: list[ast.stmt]):
    """The statements in execution order; ``with`` blocks (a CUDA device guard) inlined."""
    for statement in statements:
        if isinstance(statement, ast.With):
            yield from _flatten(statement.body)
        else:
            yield statement


def _call_name(function: ast.expr) -> str:
    if isinstance(function, ast.Name):
        return function.id
    if isinstance(function, ast.Attribute):
        return function.attr
    return ""


def _op_name(call: ast.Call) -> str:
    """The op a call names: ``torch.ops.aten.mm.default(...)`` -> ``mm``, ``f(...)`` -> ``f``."""
    function = call.func
    if isinstance(function, ast.Attribute) and function.attr == "default":
        return _call_name(function.value)
    return _call_name(function)


def _literal(call: ast.Call) -> bool:
    try:
        ast.literal_eval(call.args[0])
        ast.literal_eval(call.args[1])
    except (ValueError, IndexError, SyntaxError):
        return False
    return True


def _allocation_bytes(call: ast.Call) -> int:
    """Bytes of ``empty_strided_*(sizes, strides, dtype)`` with literal sizes and strides."""
    sizes, strides = ast.literal_eval(call.args[0]), ast.literal_eval(call.args[1])
    dtype_node = call.args[2] if len(call.args) > 2 else None
    dtype = getattr(torch, dtype_node.attr) if isinstance(dtype_node, ast.Attribute) else torch.float32
    return storage_bytes(sizes, strides, dtype)


def storage_bytes(sizes, strides, dtype: torch.dtype, offset: int = 0) -> int:
    """Bytes a strided tensor's storage spans."""
    if any(size == 0 for size in sizes):
        return 0
    elements = offset + 1 + sum((size - 1) * stride for size, stride in zip(sizes, strides))
    return elements * _element_size(dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
