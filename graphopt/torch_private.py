"""Every use of PyTorch's private AOTAutograd / partitioner / Inductor API lives here.

graphopt supports torch >=2.11,<2.15. When torch changes one of these internals, this is
the one file that changes. The rest of graphopt sees plain functions with stable
signatures: classify a joint graph, split it given a saved set, compile with Inductor or
without code generation.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._dynamo.exc
import torch.fx as fx
from torch._functorch import config as _functorch_config
from torch._functorch import partitioners as _partitioners
from torch._functorch.compile_utils import fx_graph_cse
from torch._inductor.custom_graph_pass import CustomPartitionerFn
from torch.fx.experimental.proxy_tensor import is_sym_node
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
    return len(joint.node_info.required_bw_nodes) > 0


def split_joint_graph(joint: JointGraph, saved: Sequence[fx.Node]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward modules that pass exactly `saved` (plus needed SymInts) between them.

    Everything else the backward needs is recomputed in it; torch's reordering then moves
    each recomputation next to its first use, as the autograd engine would.
    """
    module = joint.module
    saved_values = [n for n in saved if not is_sym_node(n) and not _partitioners.is_opaque_node(n)]
    saved_opaque = [n for n in saved if _partitioners.is_opaque_node(n)]
    saved_symbols = [n for n in saved if is_sym_node(n) and not _partitioners._is_assert_only_symbool(n)]
    forward, backward = _partitioners._extract_fwd_bwd_modules(
        module,
        saved_values,
        saved_sym_nodes=saved_symbols,
        saved_opaque_nodes=saved_opaque,
        num_fwd_outputs=joint.num_fwd_outputs,
        static_lifetime_input_nodes=joint.node_info.static_lifetime_input_nodes,
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


def is_random(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet in _RANDOM_TARGETS:
        return True
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def must_stay_in_forward(node: fx.Node) -> bool:
    """Nodes torch pins to the forward (mutations, effects): never recomputed."""
    return _partitioners._must_be_in_forward(node)


def checkpoint_policy(node: fx.Node) -> str | None:
    """The user's torch.utils.checkpoint / SAC policy on a node, as a plain name."""
    policy = node.meta.get("recompute")
    if policy is None:
        return None
    return policy.name if isinstance(policy, CheckpointPolicy) else str(policy)


def is_symbol(node: fx.Node) -> bool:
    return is_sym_node(node)


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


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], partition_fn: PartitionFn, uuid: str) -> Callable:
    """Inductor's full pipeline (joint-graph passes, decompositions, codegen) with our cut.

    AOTAutograd's cache is off while compiling: a hit would skip the partitioner, and
    with it the plan the user asks for. Inductor's own caches key on the split graphs,
    which are correct whoever split them; `uuid` names every input of the plan.
    """
    from torch._inductor.compile_fx import compile_fx

    patches = {"custom_partitioner_fn": _Partitioner(partition_fn, uuid)}
    with _functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches=patches)


def compile_without_codegen(gm: fx.GraphModule, example_inputs: Sequence[Any], partition_fn: PartitionFn) -> Callable:
    """AOTAutograd with our cut and no code generation: the FX graphs run as Python.

    Fast to compile, for tests and planning; memory is not freed early, so measure
    memory only with Inductor.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def run_graph(graph_module: fx.GraphModule, _inputs: Sequence[Any]) -> Callable:
        return make_boxed_func(graph_module.forward)

    backend = aot_autograd(
        fw_compiler=run_graph,
        bw_compiler=run_graph,
        partition_fn=partition_fn,
        # Inductor's table, not core ATen's: core ATen decomposes CPU flash attention's
        # forward into math whose outputs its fused backward misreads.
        decompositions=select_decomp_table(),
    )
    return backend(gm, example_inputs)
