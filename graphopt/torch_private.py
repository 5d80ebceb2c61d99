"""Every use of PyTorch's private AOTAutograd / partitioner / Inductor / fake-tensor API lives here.

graphopt supports torch >=2.13,<2.16, and tests/test_torch_private.py checks every API
used here. When torch changes one of these internals, this is the one file that
changes. The rest of graphopt sees plain functions with stable signatures: classify a
joint graph, split it given a saved set, compile with Inductor or without code
generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import operator
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._dynamo.exc
import torch.fx as fx
from torch._functorch import config as _functorch_config
from torch._functorch import partitioners as _partitioners
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.compile_utils import fx_graph_cse
from torch._inductor.custom_graph_pass import CustomPartitionerFn
from torch._inductor.decomposition import select_decomp_table

# Inductor's decompositions call into its lowering module (max-pooling asks
# `torch._inductor.lowering.should_fallback_max_pool_with_indices`), which Inductor
# imports itself only when it compiles: without code generation it must be loaded here.
import torch._inductor.lowering  # noqa: E402,F401  (import for its side effect)
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx import traceback as fx_traceback
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.experimental.proxy_tensor import is_sym_node
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree
from torch.utils._pytree import tree_iter
from torch.utils.checkpoint import CheckpointPolicy

PartitionFn = Callable[..., tuple[fx.GraphModule, fx.GraphModule]]

_OP_TYPES = _partitioners.get_default_op_list()
# Ops that draw random numbers from the global generator: the backward would draw
# different numbers, so their outputs can be saved but never recomputed. Inductor's
# `inductor_random(size, seed)` is deterministic given its seed and may be recomputed.
_RANDOM_TARGETS = {torch.ops.aten.native_dropout, torch.ops.aten.rand_like, torch.ops.aten.randn_like}


@dataclasses.dataclass(frozen=True)
class JointGraph:
    """The joint forward+backward graph, classified into its parts."""

    module: fx.GraphModule
    num_fwd_outputs: int
    forward_nodes: tuple[fx.Node, ...]  # required by the forward, in execution order
    optional_forward_nodes: frozenset[fx.Node]  # in forward_nodes, but run there only if kept
    backward_nodes: tuple[fx.Node, ...]  # everything else that computes, in execution order
    primals: tuple[fx.Node, ...]
    tangents: tuple[fx.Node, ...]
    static_inputs: frozenset[fx.Node]  # parameters and buffers (live for the whole step)
    forward_outputs: tuple[fx.Node, ...]
    backward_outputs: tuple[fx.Node, ...]
    node_info: Any  # torch's NodeInfo, handed back to extract()


def prepare_joint_graph(
    joint: fx.GraphModule, *, num_fwd_outputs: int, static_lifetime_input_indices: Sequence[int] | None
) -> JointGraph:
    """Clean the joint graph the way torch's partitioners do, then classify it."""
    joint.graph.eliminate_dead_code()
    if _functorch_config.cse:
        joint.graph = fx_graph_cse(joint.graph)
    joint.recompile()
    if _partitioners.has_recomputable_ops(joint):
        joint = _partitioners.cleanup_recompute_tags(joint, is_default_partition=False)
    _partitioners.force_save_collectives(joint)
    _partitioners.force_save_effectful_ops(joint)
    _partitioners.force_save_bw_mutation_src(joint)
    node_info = _partitioners.classify_nodes(joint, list(static_lifetime_input_indices or []), num_fwd_outputs)
    fwd_outputs, bwd_outputs, _, _ = _partitioners._extract_fwd_bwd_outputs(joint, num_fwd_outputs=num_fwd_outputs)
    required_forward = set(node_info.required_fw_nodes)
    forward_set = set(required_forward)
    # Nodes the backward reads that need no tangent could run in either pass. Those that
    # are cheaper to keep than their inputs (a ReLU's boolean mask) or free (attention's
    # logsumexp getitem) join the forward's candidates, as torch's min-cut may save them.
    # Others would only widen the program: measured on the bench GPT, moving all of them
    # raised the least reachable peak from 196 MB to 213 MB.
    for node in joint.graph.nodes:
        if node.op == "call_function" and _computable_in_forward(node, forward_set, node_info):
            if node.target is operator.getitem or _narrows(node):
                forward_set.add(node)
    forward = tuple(n for n in joint.graph.nodes if n in forward_set)
    backward = tuple(
        n for n in joint.graph.nodes if n.op == "call_function" and n not in forward_set and _in_backward(n, node_info)
    )
    backward = _as_autograd_runs(backward, node_info.tangents_closure)
    placeholders = joint.graph.find_nodes(op="placeholder")
    return JointGraph(
        module=joint,
        num_fwd_outputs=num_fwd_outputs,
        forward_nodes=forward,
        optional_forward_nodes=frozenset(forward_set - required_forward),
        backward_nodes=backward,
        primals=tuple(filter(_partitioners._is_primal, placeholders)),
        tangents=tuple(filter(_partitioners._is_tangent, placeholders)),
        static_inputs=frozenset(node_info.static_lifetime_input_nodes),
        forward_outputs=tuple(n for n in fwd_outputs if isinstance(n, fx.Node)),
        backward_outputs=tuple(n for n in bwd_outputs if isinstance(n, fx.Node)),
        node_info=node_info,
    )


def _as_autograd_runs(backward: tuple[fx.Node, ...], tangents_closure: Any) -> tuple[fx.Node, ...]:
    """The backward's nodes in the order its split runs them: each node that needs no
    tangent just before its first reader that does, as AOTAutograd orders the backward
    (``reordering_to_mimic_autograd_engine``). The joint graph may trace such a node at
    the top of the backward (the squeeze of each BatchNorm's saved inverse deviation),
    which would make what it reads needed from the backward's first step."""
    members = set(backward)
    placed: set[fx.Node] = set()
    order: list[fx.Node] = []

    def place(root: fx.Node) -> None:
        stack = [(root, iter(root.all_input_nodes))]
        while stack:
            node, sources = stack[-1]
            source = next((s for s in sources if s in members and s not in placed), None)
            if source is not None:
                stack.append((source, iter(source.all_input_nodes)))
                continue
            stack.pop()
            if node not in placed:
                placed.add(node)
                order.append(node)

    for node in backward:
        if node in tangents_closure:
            place(node)
    order += [node for node in backward if node not in placed]  # read by no tangent's work
    return tuple(order)


def _computable_in_forward(node: fx.Node, forward_set: set, node_info: Any) -> bool:
    if node in forward_set or node in node_info.tangents_closure or _partitioners._must_be_in_backward(node):
        return False
    if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
        return False
    return all(source in forward_set or _partitioners._is_primal(source) for source in node.all_input_nodes)


def _narrows(node: fx.Node) -> bool:
    """Whether the node's output has a narrower dtype than its widest tensor input."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return False
    widths = [s.meta["val"].element_size() for s in node.all_input_nodes if isinstance(s.meta.get("val"), torch.Tensor)]
    return bool(widths) and value.element_size() < max(widths)


def mutated_inputs(joint: JointGraph) -> frozenset[fx.Node]:
    """Graph inputs the graph writes in place (BatchNorm's running statistics)."""
    written = set()
    for node in joint.module.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default:
            if isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder":
                written.add(node.args[0])
    return frozenset(written)


def _in_backward(node: fx.Node, node_info: Any) -> bool:
    return node_info.is_required_bw(node) or node_info.is_unclaimed(node)


def has_backward(joint: JointGraph) -> bool:
    """Whether the graph computes a gradient (pruning frozen parameters can leave none)."""
    return len(joint.node_info.required_bw_nodes) > 0 and len(joint.backward_outputs) > 0


def split_joint_graph(
    joint: JointGraph, saved: Sequence[fx.Node], module: fx.GraphModule | None = None
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward modules that pass exactly `saved` (plus needed SymInts) between them.

    Everything else the backward needs is recomputed in it; torch's reordering then moves
    each recomputation next to its first use, as the autograd engine would. `module` is
    a rewritten copy of the joint graph to split instead (``passes.lower_saves``).
    """
    module = module if module is not None else joint.module
    saved_values = [n for n in saved if not is_sym_node(n) and not _partitioners.is_opaque_node(n)]
    saved_opaque = [n for n in saved if _partitioners.is_opaque_node(n)]
    saved_symbols = [n for n in saved if is_sym_node(n) and not _partitioners._is_assert_only_symbool(n)]
    forward, backward = _partitioners._extract_fwd_bwd_modules(
        module,
        saved_values,
        saved_sym_nodes=saved_symbols,
        saved_opaque_nodes=saved_opaque,
        num_fwd_outputs=joint.num_fwd_outputs,
        static_lifetime_input_nodes=_static_inputs_in(joint, module),
    )
    if _partitioners.has_recomputable_ops(module) and _partitioners.has_recomputable_rng_ops(module):
        forward, backward = _partitioners.functionalize_rng_ops(module, forward, backward, len(saved_symbols))
    backward = _partitioners.reordering_to_mimic_autograd_engine(backward)
    forward = _partitioners.raise_getitems(forward)
    backward = _partitioners.raise_getitems(backward)
    forward = _partitioners.thread_graphsafe_rng_from_hops(forward, is_backward=False)
    backward = _partitioners.thread_graphsafe_rng_from_hops(backward, is_backward=True)
    return forward, backward


def default_partition(
    joint: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int, static_lifetime_input_indices: Any
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """torch's save-everything partitioner, for graphs with nothing to decide."""
    return _partitioners.default_partition(
        joint,
        joint_inputs,
        num_fwd_outputs=num_fwd_outputs,
        static_lifetime_input_indices=static_lifetime_input_indices,
    )


def min_cut_partition(joint: JointGraph, joint_inputs: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
    """torch's default partitioner on an already prepared joint graph."""
    static_indices = [i for i, p in enumerate(joint.primals) if p in joint.static_inputs]
    # The graph is already CSE'd; a second CSE would replace its nodes under our feet.
    with _functorch_config.patch(cse=False):
        return _partitioners.min_cut_rematerialization_partition(
            joint.module,
            joint_inputs,
            compiler="inductor",
            num_fwd_outputs=joint.num_fwd_outputs,
            static_lifetime_input_indices=static_indices,
        )


# ----------------------------------------------------------------------------- op kinds


def is_view(node: fx.Node) -> bool:
    """Whether the node's outputs alias its first input (views, unbind, split, ...)."""
    if node.op != "call_function":
        return False
    if _OP_TYPES.is_view(node):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def is_compute_intensive(node: fx.Node) -> bool:
    return node.op == "call_function" and _OP_TYPES.is_compute_intensive(node)


def is_fusible(node: fx.Node) -> bool:
    """Pointwise-like ops Inductor fuses into their consumers."""
    return node.op == "call_function" and _OP_TYPES.is_fusible(node)


# Extern kernels Inductor calls with an ``out=`` buffer its wrapper allocates (other
# extern and fallback ops allocate their own outputs).
_EXTERN_OUT_TARGETS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}


def wrapper_allocates(node: fx.Node) -> bool:
    """Whether Inductor's generated wrapper allocates the node's output buffer (so its
    buffer-reuse pool can hand it a dead buffer): generated kernels and ``out=`` extern
    calls do; fallback ops, convolutions and the outputs of multi-output ops allocate
    their own."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    if is_compute_intensive(node):
        return getattr(node.target, "overloadpacket", None) in _EXTERN_OUT_TARGETS
    return True


def inductor_estimates_input(name: str) -> bool:
    """Whether Inductor's peak-memory estimate (``memory.get_freeable_input_buf``) counts a
    graph input of this placeholder name: it leaves out parameters, tangents and RNG
    state (``utils.is_nonfreeable_buffers``, by name prefix)."""
    return not name.startswith(("primals_", "arg", "fwd_rng_state", "bwd_rng_state", "tangents"))


# What Dynamo records for ``nn.Linear`` and ``F.linear``: the private binding, or the public one.
_LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear)


def is_linear_call(node: fx.Node) -> bool:
    """Whether a Dynamo graph's node is a call of ``linear`` (passes/chunk_loss.py)."""
    return node.op == "call_function" and is_linear_function(node.target)


def is_linear_function(function: object) -> bool:
    """Whether `function` (a graph node's target, or what a TorchFunctionMode sees) is ``linear``."""
    return function in _LINEAR_FUNCTIONS


def is_random(node: fx.Node) -> bool:
    """Whether the node draws random numbers, so a recomputation would draw others.

    Attention ops carry the ``nondeterministic_seeded`` tag for their dropout; with
    ``dropout_p`` 0 they draw nothing and recompute exactly (torch's checkpointing reruns
    them too).
    """
    if node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet in _RANDOM_TARGETS:
        return True
    if not isinstance(target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    return _argument(node, "dropout_p", default=None) != 0


def _argument(node: fx.Node, name: str, *, default: Any) -> Any:
    """The value `node` passes for its op's argument `name` (the schema's default when
    it passes none), or `default` where the op has no such argument."""
    for position, argument in enumerate(node.target._schema.arguments):
        if argument.name != name:
            continue
        if name in node.kwargs:
            return node.kwargs[name]
        if position < len(node.args) and not argument.kwarg_only:
            return node.args[position]
        return argument.default_value if argument.has_default_value() else default
    return default


def must_stay_in_forward(node: fx.Node) -> bool:
    """Nodes torch pins to the forward (mutations, effects): never recomputed."""
    return _partitioners._must_be_in_forward(node)


def require_recompute(node: fx.Node) -> None:
    """Tag `node` as a checkpoint policy's ``MUST_RECOMPUTE`` would: never saved."""
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


def checkpoint_policy(node: fx.Node) -> str | None:
    """The user's torch.utils.checkpoint / SAC policy on a node, as a plain name."""
    policy = node.meta.get("recompute")
    if policy is None:
        return None
    return policy.name if isinstance(policy, CheckpointPolicy) else str(policy)


def is_symbol(node: fx.Node) -> bool:
    return is_sym_node(node)


def overload_packet(node: fx.Node) -> Any:
    """The overload packet (``aten.mm``) of a call to an op overload or packet, None for
    anything else (Python functions, ``operator.getitem``)."""
    if node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket
    if isinstance(node.target, torch._ops.OpOverloadPacket):
        return node.target
    return None


def is_pointwise(node: fx.Node) -> bool:
    """Whether the node calls an op overload tagged ``torch.Tag.pointwise``."""
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


def map_nested(fn: Callable[[Any], Any], value: Any) -> Any:
    """`value` with `fn` applied to every leaf of its nested tuples, lists and dicts
    (torch's pytree, which also knows FX's immutable containers)."""
    return _pytree.tree_map(fn, value)


def nested_leaves(value: Any) -> list[Any]:
    """The leaves of `value`'s nested tuples, lists and dicts, in order (torch's pytree)."""
    return _pytree.tree_leaves(value)


# ----------------------------------------------------------------------------- compilation


class PassesThroughDynamo(torch._dynamo.exc.ShortenTraceback):
    """An exception dynamo re-raises as is, instead of wrapping it in BackendCompilerFailed."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args, first_useful_frame=None)



class _Partitioner(CustomPartitionerFn):
    """Inductor's `custom_partitioner_fn` calling `fn(joint, joint_inputs, **kw)`."""

    def __init__(self, fn: PartitionFn, uuid: str):
        self._fn = fn
        self._uuid = uuid

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        return self._fn(gm, joint_inputs, **kwargs)

    def uuid(self) -> str:
        return self._uuid

    def __deepcopy__(self, memo: dict) -> _Partitioner:
        # Inductor's config.patch deep-copies values; ours holds the session it plans
        # into, which must stay shared.
        return self


def compiled_forward(compiled: torch.nn.Module) -> Callable:
    """What ``torch.compile(module)``'s result calls for its forward (Dynamo's entry)."""
    return compiled.forward


def set_compiled_forward(compiled: torch.nn.Module, forward: Callable) -> None:
    """Route calls of ``torch.compile(module)``'s result through `forward`: its
    ``__call__`` runs hooks and then the instance's ``forward`` attribute."""
    compiled.forward = forward


def one_graph_under_ddp() -> Any:
    """A context in which Dynamo compiles a ``DistributedDataParallel`` module's forward
    as one graph: its DDPOptimizer, which splits the graph at gradient-bucket boundaries
    so that each bucket's all-reduce overlaps the rest of the backward, is off. DDP's
    reducer then all-reduces every bucket after the compiled backward. Read by Dynamo
    when it converts a frame, so it must surround the calls, not the compile."""
    return torch._dynamo.config.patch(optimize_ddp=False)


def compiling_under_ddp() -> bool:
    """Whether Dynamo is compiling the forward of a ``DistributedDataParallel`` module:
    DDP marks itself active around its inner module's forward, which Dynamo traces."""
    if not torch.distributed.is_available():
        return False
    return torch.nn.parallel.DistributedDataParallel._get_active_ddp_module() is not None


RECOMPILE_LIMIT_SETTING = "torch._dynamo.config.recompile_limit"


def only_compiled_frames(replans: int) -> Any:
    """A context in which a frame past Dynamo's recompile limit raises instead of running
    uncompiled (Dynamo's default runs it eagerly, outside every plan), with the limit
    raised by its value for each time graphopt compiled the model again for a new
    backend (each time counts against the limit of every frame). Read when a frame is
    converted, so it must surround the calls."""
    from torch._dynamo import config as dynamo_config

    return dynamo_config.patch(
        fail_on_recompile_limit_hit=True, recompile_limit=dynamo_config.recompile_limit * (replans + 1)
    )


def written_input_positions(num_inputs: int) -> tuple[int, ...]:
    """Positions among the inputs of the graph just compiled (by the backend Dynamo
    called) that its forward writes in place: a BatchNorm's running statistics and
    ``num_batches_tracked``. AOTAutograd leaves its analysis of the graph's inputs on
    the tracing context; () where it left none, or for other inputs than the graph's
    (tensor subclasses flattened)."""
    context = torch._guards.TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    if metadata is None or len(metadata.input_info) != num_inputs:
        return ()
    return tuple(i for i, info in enumerate(metadata.input_info) if info.mutates_data)


# How Dynamo records a frame whose tracing failed softly (a graph break inside a for/while
# loop, among others) among the frames it skips: it then runs that frame eagerly.
_FAILED_COMPILE_REASONS = (
    "an error was suppressed during compilation",
    "compilation failed with a custom frame execution strategy",
)


@contextlib.contextmanager
def frames_run_uncompiled() -> Any:
    """A context that collects, as ``"name (file:line)"``, the frames Dynamo tried to
    compile within it and ran eagerly instead because tracing them failed: a graph break
    inside a for/while loop makes Dynamo skip the whole frame (``torch._dynamo``'s
    ``graph break in loop``), so every tensor op in it runs outside the compiled graphs.
    Frames Dynamo never compiles (torch's own, frames without tensors) are not listed.
    A frame is traced once: later calls of it are not listed again. Reads Dynamo's
    thread-local record of skip reasons, which it keeps only while it is a list."""
    from torch._dynamo import eval_frame

    previous = eval_frame.dynamo_tls.skip_reasons
    eval_frame.reset_skip_reasons()
    failed: list[str] = []
    try:
        yield failed
    finally:
        for reason in eval_frame.get_skip_reasons():
            frame, _, why = reason.rpartition(": ")
            if why in _FAILED_COMPILE_REASONS:
                failed.append(frame)
        if previous is not None:
            previous.extend(eval_frame.get_skip_reasons())
        eval_frame.dynamo_tls.skip_reasons = previous


def recompile_limit_hit(error: BaseException) -> bool:
    """Whether `error` is Dynamo's refusal to compile a frame past its recompile limit."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    return isinstance(error, FailOnRecompileLimitHit) or isinstance(error.__cause__, FailOnRecompileLimitHit)


def recompile_limit() -> int:
    from torch._dynamo import config as dynamo_config

    return dynamo_config.recompile_limit


def compiling_ddp_bucket_graph() -> bool:
    """Whether the graph being compiled is one piece of a DDP model that Dynamo's
    DDPOptimizer split at its gradient buckets (it marks the tracing context)."""
    context = torch._guards.TracingContext.try_get()
    return context is not None and getattr(context, "ddp_optimizer_ctx", None) is not None


def is_fake(value: Any) -> bool:
    """Whether `value` is a fake tensor (a compile-time stand-in, no data)."""
    return isinstance(value, FakeTensor)


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], partition_fn: PartitionFn, uuid: str) -> Callable:
    """Inductor's full pipeline (joint-graph passes, decompositions, codegen) with our cut.

    AOTAutograd's cache is off while compiling: a hit would skip the partitioner, and
    with it the plan the user asks for. Inductor's own caches key on the split graphs,
    which are correct whoever split them; `uuid` names every input of the plan.
    """
    from torch._inductor.compile_fx import compile_fx

    patches = {"custom_partitioner_fn": _Partitioner(partition_fn, uuid)}
    with _functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=_compile_graph_as_planned, config_patches=patches)


def compile_without_codegen(gm: fx.GraphModule, example_inputs: Sequence[Any], partition_fn: PartitionFn) -> Callable:
    """AOTAutograd with our cut and no code generation: the FX graphs run as Python.

    The joint graph is the one Inductor partitions (its joint-graph passes run first),
    so plans are Inductor's. Fast to compile, for tests and planning. Each graph runs
    through an FX interpreter with the boxed calling convention, as Inductor's code
    does: an input (a saved tensor) and every value are freed after their last use,
    where graphopt's simulation of the FX graphs frees them. (A graph run as one Python
    call would hold every input until it returns: the measured peak of a plan that
    recomputes was up to 30% above its prediction.)
    """
    from torch._dynamo.backends.common import aot_autograd

    def run_graph(graph_module: fx.GraphModule, _inputs: Sequence[Any]) -> Callable:
        def run(args: list[Any]) -> Any:
            return fx.Interpreter(graph_module, garbage_collect_values=True).boxed_run(args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def partition_as_inductor(joint: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        # The graph Inductor would partition, so that plans match; random ops stay
        # aten's (Inductor's own would draw other numbers than eager PyTorch).
        from torch._inductor import config as inductor_config

        with inductor_config.patch(fallback_random=True):
            joint = _inductor_joint_passes(joint, joint_inputs)
        return partition_fn(joint, joint_inputs, **kwargs)

    backend = aot_autograd(
        fw_compiler=run_graph,
        bw_compiler=run_graph,
        partition_fn=partition_as_inductor,
        # Inductor's table, not core ATen's: core ATen decomposes CPU flash attention's
        # forward into math whose outputs its fused backward misreads.
        decompositions=select_decomp_table(),
    )
    return backend(gm, example_inputs)


# Offline planning (``graphopt plan``): tracing a training step on fake tensors.


def new_fake_mode() -> FakeTensorMode:
    """A fake-tensor mode with static shapes: sizes in the graph are plain ints."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def to_fake(mode: FakeTensorMode, tensor: torch.Tensor, meta_device: torch.device) -> torch.Tensor:
    """A fake copy of `tensor`: same shape, strides, dtype and requires_grad, no data.

    A real tensor keeps its device (nothing is moved or read); a meta tensor becomes a
    fake tensor on `meta_device`. Tracing on "meta" itself is not an option: some ops
    (cross-entropy's nll_loss) record no autograd history there under AOTAutograd.
    """
    if tensor.device.type == "meta":
        fresh = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
        fake = mode.fake_tensor_converter.from_meta_and_device(mode, fresh, meta_device)
    else:
        fake = mode.from_tensor(tensor.detach())
    if tensor.requires_grad:
        fake.requires_grad_(True)
    return fake


class _JointTraced(Exception):
    """Stops AOTAutograd once the joint graph is planned: nothing is compiled or run."""


class _NoBackward(Exception):
    """AOTAutograd traced an inference graph: the step's output needs no gradient."""


def trace_joint(
    step: torch.nn.Module,
    fake_args: Sequence[torch.Tensor],
    on_joint: Callable[[fx.GraphModule, Sequence[Any], int], None],
) -> bool:
    """Trace `step(*fake_args)` forward and backward with AOTAutograd, as ``torch.compile``
    does (Inductor's decompositions), and call ``on_joint(joint, joint_inputs,
    num_fwd_outputs)`` where the partitioner would run, in the tracer's context.

    `step` must return a tuple and own no parameters; every value is a fake tensor.
    Returns False, without calling `on_joint`, when the step has no backward.
    """

    def partition_fn(joint: fx.GraphModule, joint_inputs: Sequence[Any], *, num_fwd_outputs: int, **_: Any):
        on_joint(_inductor_joint_passes(joint, joint_inputs), joint_inputs, num_fwd_outputs)
        raise _JointTraced

    def inference_only(graph_module: fx.GraphModule, _inputs: Sequence[Any]) -> Callable:
        raise _NoBackward  # the only compiler reached before a partition is the inference one

    import torch._inductor.lowering  # noqa: F401  (Inductor's decompositions consult it: max-pooling)

    try:
        aot_module_simplified(
            step,
            list(fake_args),
            fw_compiler=inference_only,
            bw_compiler=inference_only,
            partition_fn=partition_fn,
            decompositions=select_decomp_table(),
        )
    except _JointTraced:
        return True
    except _NoBackward:
        return False
    raise AssertionError("AOTAutograd returned without partitioning or compiling")


def _inductor_joint_passes(joint: fx.GraphModule, joint_inputs: Sequence[Any]) -> fx.GraphModule:
    """The joint graph after Inductor's joint-graph passes, which ``torch.compile`` runs
    before any partitioner (``compile_fx.partition_fn``), custom ones included.

    They rewrite what the partitioner sees (a log-softmax saves its output rather than
    the logits and their max); skipping them, offline plans of the bench GPT predicted
    396 MB for a min-cut step that compiles to 331 MB.
    """
    from torch._inductor import compile_fx as inductor_compile_fx

    passes = getattr(inductor_compile_fx, "_recursive_joint_graph_passes", None)
    if passes is None:
        return joint
    accepted = inspect.signature(passes).parameters
    options: dict[str, Any] = {}
    if "skip_invoke_subgraph" in accepted:
        options["skip_invoke_subgraph"] = True
    if "input_device" in accepted:
        options["input_device"] = next((t.device for t in tree_iter(joint_inputs) if isinstance(t, torch.Tensor)), None)
    return passes(joint, **options)


class UserCodeMode(TorchFunctionMode):
    """While tracing, sees each torch-level call the user's code makes.

    It tags the call's graph nodes with `meta_fn()`'s fields: Dynamo leaves
    ``nn_module_stack`` and ``stack_trace`` on its nodes and AOTAutograd copies them onto
    the aten nodes; without Dynamo, this mode supplies them. A nested call inside a torch
    function is not seen again, so the outermost call, the user's, names the source.
    A meta tensor the model holds outside its parameters, buffers and inputs (a plain
    attribute) cannot become a graph constant; `on_stray_meta(tensor)` is called on it
    first, to raise an error that says so.
    """

    def __init__(self, meta_fn: Callable[[], dict[str, Any]], on_stray_meta: Callable[[torch.Tensor], None]):
        super().__init__()
        self._meta_fn = meta_fn
        self._on_stray_meta = on_stray_meta
        self._carrier = fx.Graph().placeholder("graphopt_meta")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in tree_iter((args, kwargs)):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta" and not isinstance(tensor, FakeTensor):
                self._on_stray_meta(tensor)
        self._carrier.meta = self._meta_fn()
        with fx_traceback.set_current_meta(self._carrier):
            return func(*args, **kwargs)


# ----------------------------------------------------------------------------- memory-aware reordering
# What pins a node's place when graphopt reorders a graph (graphopt/passes/reorder_graph.py),
# and how a graph graphopt reordered keeps that order through Inductor.

# Set on a forward/backward module whose order graphopt chose over Inductor's own.
_KEEP_ORDER_META = "graphopt_keep_order"


def keeps_relative_order(node: fx.Node) -> bool:
    """Side effects, mutations and random draws: run in their original relative order."""
    if node.op != "call_function":
        return False
    return is_random(node) or node.is_impure(impure_random=False)


def is_order_barrier(node: fx.Node) -> bool:
    """Nodes nothing may move across: RNG state ops (saving, restoring or threading the
    generator's state, as functionalized RNG and graph-safe RNG do) and in-place writes
    (a reader of the written tensor must stay on its side of the write)."""
    if node.op != "call_function":
        return False
    if "rng_state" in str(node.target):
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def keep_order_through_inductor(graph_module: fx.GraphModule) -> None:
    """Compile this graph with Inductor's own ``reorder_for_peak_memory`` off, so the
    order graphopt chose (lower than Inductor's heuristics on graphopt's simulation) is
    the order Inductor's scheduler keeps."""
    graph_module.meta[_KEEP_ORDER_META] = True


def _compile_graph_as_planned(graph_module: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """Inductor's ``compile_fx_inner`` for one forward or backward graph, with
    ``reorder_for_peak_memory`` off where graphopt's order won. The setting enters
    Inductor's FX-graph cache key, so a cached graph compiled the other way is not reused."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner

    if graph_module.meta.get(_KEEP_ORDER_META):
        with inductor_config.patch(reorder_for_peak_memory=False, **_buffer_reuse_guard(inductor_config)):
            return compile_fx_inner(graph_module, example_inputs, **kwargs)
    return compile_fx_inner(graph_module, example_inputs, **kwargs)


def _buffer_reuse_guard(inductor_config: Any) -> dict[str, Any]:
    """Settings that keep Inductor's buffer reuse within its peak estimate when its
    peak-memory reordering is off: the sizing pass, or no buffer reuse at all where the
    user runs a post-fusion pass of their own or this torch lacks the hooks."""
    sizing = _sizing_pass()
    if sizing is not None and getattr(inductor_config, "_post_fusion_custom_pass", False) is None:
        return {"_post_fusion_custom_pass": sizing}
    return {"allow_buffer_reuse": False}


@functools.cache
def _sizing_pass() -> Any:
    """A post-fusion scheduler pass that gives Inductor's buffer-reuse guard the buffer
    sizes it reads; None where this torch has no such hooks.

    Inductor hands a dead buffer to a later one of the same size only if holding it in
    between keeps its estimated peak (``EfficientPeakEstimate``). Those estimates read the
    memory-planning info that ``reorder_for_peak_memory`` assigns; with that pass off every
    size reads 0, the guard lets every reuse through, and dead buffers are held across the
    graph (3.2 MB, 9% of the step, on a ViT backward). The order is unchanged.
    """
    try:
        from torch._inductor.custom_graph_pass import CustomSchedulerPass
        from torch._inductor.memory import assign_memory_planning_info_for_scheduler_buffers
    except ImportError:
        return None
    from torch._inductor.virtualized import V

    class SizeBuffersForReuse(CustomSchedulerPass):
        def __call__(self, nodes: list[Any]) -> list[Any]:
            assign_memory_planning_info_for_scheduler_buffers(nodes, V.graph.scheduler.name_to_buf)
            return nodes

        def uuid(self) -> str:  # Inductor's FX-graph cache key
            return "graphopt-size-buffers-for-reuse-1"

    return SizeBuffersForReuse()


@dataclasses.dataclass(frozen=True)
class WrapperCode:
    """The Python wrapper Inductor generated for a graph, and by name, for its buffers
    and inputs, the bytes of their storage, their strides, sizes and dtypes."""

    source: str
    buffer_bytes: dict[str, int]
    strides: dict[str, tuple[int, ...]]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]


def generate_wrapper_code(
    graph_module: fx.GraphModule,
    donated: Sequence[int] = (),
    *,
    is_backward: bool = False,
    keep_order: bool = False,
    input_strides: dict[str, tuple[int, ...]] | None = None,
) -> WrapperCode:
    """The Python wrapper Inductor generates for one forward or backward graph, without
    compiling a kernel, and the storage bytes and strides of its buffers and inputs.

    The graph is lowered and scheduled as ``compile_fx_inner`` would (post-grad passes,
    fusion, in-place and buffer-reuse planning, the order settings graphopt compiles it
    with); only the kernels' compilation and the module's loading are left out. Works on
    a copy: the post-grad passes rewrite the graph they are given. `donated`: the
    backward's inputs AOTAutograd donates to it (``backward_donated_inputs``), whose
    buffers Inductor may write over. `keep_order`: compiled as ``keep_order_through_inductor``
    makes it (the graph's meta may say so too). `input_strides`: by placeholder name, the
    strides the inputs will have where they differ from the graph's: the backward's
    saved tensors as the compiled forward returns them (Inductor may lay them out
    channels-last), with which AOTAutograd compiles the backward
    (``_aot_stage2b_bw_compile``).
    """
    from torch._inductor import config as inductor_config

    copy, _ = copy_graph_module(graph_module)
    copy.meta.update(graph_module.meta)
    placeholders = copy.graph.find_nodes(op="placeholder")
    inputs = [node.meta["val"] for node in placeholders]
    fake_mode = torch._guards.detect_fake_mode(inputs) or FakeTensorMode()
    at_hints = any(_symbolic(value) for value in inputs)
    if at_hints:
        fake_mode, inputs = _at_hints(copy, inputs)
    for position, node in enumerate(placeholders):
        stride, value = (input_strides or {}).get(node.name), inputs[position]
        if stride is not None and isinstance(value, torch.Tensor) and tuple(value.stride()) != tuple(stride):
            with fake_mode:
                inputs[position] = node.meta["val"] = value.as_strided(value.size(), stride)
    patches = {}
    if keep_order or graph_module.meta.get(_KEEP_ORDER_META):
        patches = {"reorder_for_peak_memory": False, **_buffer_reuse_guard(inductor_config)}
    context = torch._guards.TracingContext(fake_mode)
    context.fw_metadata = types.SimpleNamespace(bw_donated_idxs=list(donated))  # what get_donated_idxs() reads
    # Constants the graph holds are real tensors (the RNG state torch.utils.checkpoint
    # saves around a random op), which some lowerings inspect (``aten.is_pinned``).
    allowed, fake_mode.allow_non_fake_inputs = fake_mode.allow_non_fake_inputs, True
    try:
        # Out of the compile's own fake mode, which would reject the static copy's tensors.
        with unset_fake_temporarily() if at_hints else contextlib.nullcontext():
            return _lower_to_wrapper(copy, inputs, fake_mode, context, patches, is_backward, placeholders)
    finally:
        fake_mode.allow_non_fake_inputs = allowed


def _symbolic(value: object) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in (*value.shape, *value.stride()))


def _at_hints(graph_module: fx.GraphModule, inputs: list[Any]) -> tuple[FakeTensorMode, list[Any]]:
    """A graph traced for symbolic sizes, made static at its sizes' hints (the sizes it
    was traced at) in a fake mode of its own: its values' metadata propagated again from
    inputs of those sizes. Lowering the symbolic graph itself would guard on its sizes in
    Dynamo's shape environment (``int()`` of a size, Inductor's own checks), which
    specializes the compiled graph to one shape."""
    from .cost_models.memory import concrete_size

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def static(value: Any) -> Any:
        if isinstance(value, torch.SymInt):
            return concrete_size(value)
        if not isinstance(value, torch.Tensor):
            return value
        shape = [concrete_size(size) for size in value.shape]
        stride = [concrete_size(size) for size in value.stride()]
        with mode:
            tensor = torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
        return tensor.as_strided(shape, stride, concrete_size(value.storage_offset())) if value.storage_offset() else tensor

    with unset_fake_temporarily():
        inputs = [static(value) for value in inputs]
        FakeTensorProp(graph_module, mode=mode).propagate_dont_convert_inputs(*inputs)
    return mode, inputs


def _lower_to_wrapper(copy, inputs, fake_mode, context, patches, is_backward, placeholders) -> WrapperCode:
    """``generate_wrapper_code``'s lowering of the prepared copy."""
    from torch._inductor import config as inductor_config
    from torch._inductor import ir
    from torch._inductor.compile_fx import _recursive_post_grad_passes
    from torch._inductor.debug import DebugContext
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V

    from .cost_models.wrapper_memory import storage_bytes

    with torch._guards.tracing(context), V.set_fake_mode(fake_mode), DebugContext(), inductor_config.patch(patches):
        _recursive_post_grad_passes(copy, is_inference=False)
        graph = GraphLowering(copy, example_inputs=inputs, shape_env=fake_mode.shape_env, is_inference=False, is_backward=is_backward)
        with V.set_graph_handler(graph):
            graph.run(*inputs)
            wrapper, _ = graph.codegen()
            sizes, strides, shapes, dtypes = {}, {}, {}, {}
            # The method's name changed across releases (size_hint before 2.13).
            hint = getattr(graph.sizevars, "optimization_hint", None) or graph.sizevars.size_hint
            for name, buffer in graph.name_to_buffer.items():
                layout = getattr(buffer, "layout", None)  # get_layout() raises on a multi-output op
                if isinstance(layout, ir.Layout):
                    size, stride = [hint(s) for s in layout.size], tuple(hint(s) for s in layout.stride)
                    sizes[name] = storage_bytes(size, stride, layout.dtype, hint(layout.offset))
                    strides[name], shapes[name], dtypes[name] = stride, tuple(size), layout.dtype
    for node, value in zip(placeholders, inputs):
        if isinstance(value, torch.Tensor):
            stride, shape = tuple(int(s) for s in value.stride()), tuple(int(s) for s in value.shape)
            sizes[node.name] = storage_bytes(shape, stride, value.dtype, int(value.storage_offset()))
            strides[node.name], shapes[node.name], dtypes[node.name] = stride, shape, value.dtype
    return WrapperCode(wrapper.value, sizes, strides, shapes, dtypes)


def real_tensors() -> contextlib.AbstractContextManager:
    """Leave the fake-tensor mode a compile has active (AOTAutograd calls the partitioner
    inside it): tensors made and ops run within are real."""
    return unset_fake_temporarily()


def cpu_allocated_peak(fn: Callable[[], object]) -> tuple[object, int]:
    """Call ``fn()`` under torch's profiler and return its result with the peak of bytes
    the CPU allocator had handed out during the call above what it had before: every
    allocation and free the profiler records (``profile_memory``), replayed in time
    order. The CPU's analogue of ``torch.cuda.max_memory_allocated``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, change in events:
        live += change
        peak = max(peak, live)
    return result, peak


def backward_donated_inputs(forward: fx.GraphModule, backward: fx.GraphModule, num_fwd_outputs: int) -> list[int]:
    """Positions of the backward's inputs AOTAutograd donates to it: saved tensors that
    alias no forward input, user output or gradient (``collect_bw_donated_buffer_idxs``,
    which reads metadata only set after partitioning)."""
    from torch._functorch._aot_autograd.graph_compile import collect_fw_donated_buffer_idxs

    if not _functorch_config.donated_buffer:
        return []
    values = lambda nodes: [n.meta.get("val") if isinstance(n, fx.Node) else None for n in nodes]  # noqa: E731
    forward_outputs = next(reversed(forward.graph.find_nodes(op="output"))).args[0]
    backward_outputs = next(reversed(backward.graph.find_nodes(op="output"))).args[0]
    backward_inputs = backward.graph.find_nodes(op="placeholder")
    symbols = sum(1 for node in backward_inputs if is_sym_node(node))
    saved = [n for n in backward_inputs[symbols:] if not _partitioners._is_tangent(n) and not is_sym_node(n)]
    donated = collect_fw_donated_buffer_idxs(
        values(forward.graph.find_nodes(op="placeholder")),
        values(forward_outputs[:num_fwd_outputs]),
        values(backward_outputs),
        values(forward_outputs[num_fwd_outputs : num_fwd_outputs + len(saved)]),
    )
    return [symbols + i for i in donated]


# ----------------------------------------------------------------------------- parameter names (sparse backward)


def parameter_input_names(graph_module: fx.GraphModule, example_inputs: Sequence[Any]) -> list[str | None]:
    """The ``named_parameters()`` name of each graph input that is a parameter, from the
    source Dynamo recorded for it (``L['self']._modules['blocks']._modules['0']._parameters['weight']``
    -> ``blocks.0.weight``); None for other inputs.

    Used only when graphopt does not see the model (``torch.compile(backend="graphopt")``);
    the name is relative to whatever object the compiled frame reached the parameter from.
    """
    names: list[str | None] = []
    placeholders = graph_module.graph.find_nodes(op="placeholder")
    for placeholder, value in zip(placeholders, example_inputs):
        grapharg = placeholder.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if not isinstance(value, torch.nn.Parameter) or source is None:
            names.append(None)
            continue
        text = source.name() if callable(source.name) else source.name
        names.append(source_attribute_path(text))
    return names


def source_attribute_path(source: str) -> str:
    """The dotted attribute path in a Dynamo source string, as ``named_modules()`` and
    ``named_parameters()`` spell it: ``L['self']._modules['blocks']._modules['0']`` and
    ``getattr(L['self'].blocks, '0')`` -> ``blocks.0`` (the path of an ``nn_module_stack``
    entry, or of a parameter's ``grapharg.source``)."""
    previous = None
    path = source
    while path != previous:  # getattr(getattr(L['self'].a, '0'), 'b') nests
        previous, path = path, re.sub(r"getattr\(([^,()]+), '([^']+)'\)", r"\1.\2", path)
    path = re.sub(r"^[LG]\['[^']+'\]", "", path)
    path = re.sub(r"\._(?:modules|parameters)\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


# ----------------------------------------------------------------------------- optimizer in backward


def current_frame_id() -> int | None:
    """The Dynamo frame being compiled: a recompilation keeps it, a graph break's resume
    function gets a new one (``torch._guards.CompileId.frame_id``); None outside Dynamo."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return None if compile_id is None else compile_id.frame_id


def compiled_at_graph_break(graph_module: fx.GraphModule) -> bool:
    """Whether Dynamo compiled this graph because of a graph break, so that more of its
    frame (and more graphs) run after it in the same call: the reason Dynamo records on
    the graph it hands a backend (``OutputGraph.compile_subgraph_reason``, read by torch's
    own ``explain``). False for a graph that ends its frame, and outside Dynamo."""
    reason = getattr(graph_module, "compile_subgraph_reason", None)
    return bool(getattr(reason, "graph_break", False))


# ----------------------------------------------------------------------------- offload and quantize lowering


def _static_inputs_in(joint: JointGraph, module: fx.GraphModule) -> Any:
    """torch's set of static-lifetime inputs, as nodes of `module` (a copy of the joint graph)."""
    static = joint.node_info.static_lifetime_input_nodes
    if module is joint.module:
        return static
    names = {node.name for node in static}
    return type(static)(n for n in module.graph.find_nodes(op="placeholder") if n.name in names)


def copy_graph_module(module: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of the module's graph to rewrite, and the map from its nodes to the copy's.

    Nodes keep their names and (shallow-copied) metadata, the output its ``desc``
    (which AOTAutograd's split reads).
    """
    copy_of: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph()
    result = graph.graph_copy(module.graph, copy_of)
    output = next(iter(module.graph.find_nodes(op="output")))
    graph.output(result).meta = dict(output.meta)
    return fx.GraphModule(module, graph), copy_of


def copy_dynamo_graph_module(module: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """A copy of a graph Dynamo captured, to rewrite before AOTAutograd traces it, and
    the copy's nodes by name. AOTAutograd reads what Dynamo attached besides the graph:
    each placeholder's ``_dynamo_source``, the module's ``_param_name_to_source`` and
    ``meta``; the copy carries them."""
    copy, copy_of = copy_graph_module(module)
    for node, copied in copy_of.items():
        if hasattr(node, "_dynamo_source"):
            copied._dynamo_source = node._dynamo_source
    for name, value in vars(module).items():
        if name not in vars(copy):
            setattr(copy, name, value)
    copy.meta = dict(module.meta)
    return copy, {node.name: node for node in copy.graph.nodes}


# The partitioner's node tags that pin a node to one side of the split
# (``_must_be_in_forward`` / ``_must_be_in_backward`` read them), by side.
_SIDE_TAGS = {"forward": "must_be_in_forward", "backward": "must_be_in_backward"}


def pin_to(node: fx.Node, side: str) -> None:
    """Make torch's split put `node` in the "forward" or the "backward" graph."""
    node.meta["partitioner_tag"] = _SIDE_TAGS[side]


def is_pinned_to_backward(node: fx.Node) -> bool:
    """Whether `node` was pinned to the backward graph (``pin_to(node, "backward")``)."""
    return node.meta.get("partitioner_tag") == _SIDE_TAGS["backward"]


class NodeEmitter:
    """Adds ``op(*args, **kwargs)`` nodes to a graph before a given node, each with its
    FakeTensor ``meta["val"]`` (computed in the graph's own fake mode, as if traced) and
    pinned to the `side` ("forward" or "backward") of the split it belongs to, or left
    to the split (`side` None)."""

    def __init__(self, graph: fx.Graph, *, insert_before: fx.Node, side: str | None):
        self._graph = graph
        self._before = insert_before
        self._side = side

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        values = fx.node.map_arg((args, kwargs), lambda node: node.meta["val"])
        fake_mode = torch._guards.detect_fake_mode(list(tree_iter(values)))
        with self._graph.inserting_before(self._before):
            node = self._graph.call_function(op, args, kwargs)
        with fake_mode:
            node.meta["val"] = op(*values[0], **values[1])
        if self._side is not None:
            pin_to(node, self._side)
        return node

