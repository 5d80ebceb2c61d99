"""One check per private PyTorch API graphopt uses, all of them in graphopt/torch_private.py.

When a torch release renames, moves or changes one of them, the test that fails names
the API and the torch_private function to update, instead of a planning test failing
three layers away. Run them against another release with ``make test-torch VERSION=...``.

Kept fast: no kernel is compiled. ``compile_with_inductor`` is exercised by
tests/test_inductor.py and ``generate_wrapper_code`` by tests/test_wrapper_memory.py;
here only the private names they reach are checked.
"""

from __future__ import annotations

import importlib
import inspect
import types

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.checkpoint import CheckpointPolicy

from graphopt import torch_private

aten = torch.ops.aten

# (module, attribute): every private name torch_private.py reaches, and where it does.
PRIVATE_NAMES = [
    ("torch._C._nn", "linear", "is_linear_call"),
    ("torch._dynamo.exc", "ShortenTraceback", "PassesThroughDynamo"),
    ("torch._dynamo.backends.common", "aot_autograd", "compile_without_codegen"),
    ("torch._dynamo.config", "optimize_ddp", "one_graph_under_ddp"),
    ("torch._functorch.config", "cse", "prepare_joint_graph"),
    ("torch._functorch.config", "enable_autograd_cache", "compile_with_inductor"),
    ("torch._functorch.config", "donated_buffer", "backward_donated_inputs"),
    ("torch._functorch.aot_autograd", "aot_module_simplified", "trace_joint"),
    ("torch._functorch.compile_utils", "fx_graph_cse", "prepare_joint_graph"),
    ("torch._functorch._aot_autograd.graph_compile", "collect_fw_donated_buffer_idxs", "backward_donated_inputs"),
    ("torch._functorch.partitioners", "get_default_op_list", "is_view / is_compute_intensive / is_fusible"),
    ("torch._functorch.partitioners", "has_recomputable_ops", "prepare_joint_graph / split_joint_graph"),
    ("torch._functorch.partitioners", "has_recomputable_rng_ops", "split_joint_graph"),
    ("torch._functorch.partitioners", "cleanup_recompute_tags", "prepare_joint_graph"),
    ("torch._functorch.partitioners", "force_save_collectives", "prepare_joint_graph"),
    ("torch._functorch.partitioners", "force_save_effectful_ops", "prepare_joint_graph"),
    ("torch._functorch.partitioners", "force_save_bw_mutation_src", "prepare_joint_graph"),
    ("torch._functorch.partitioners", "classify_nodes", "prepare_joint_graph"),
    ("torch._functorch.partitioners", "_extract_fwd_bwd_outputs", "prepare_joint_graph"),
    ("torch._functorch.partitioners", "_extract_fwd_bwd_modules", "split_joint_graph"),
    ("torch._functorch.partitioners", "_is_primal", "prepare_joint_graph"),
    ("torch._functorch.partitioners", "_is_tangent", "prepare_joint_graph / backward_donated_inputs"),
    ("torch._functorch.partitioners", "_must_be_in_forward", "must_stay_in_forward"),
    ("torch._functorch.partitioners", "_must_be_in_backward", "prepare_joint_graph"),
    ("torch._functorch.partitioners", "_is_assert_only_symbool", "split_joint_graph"),
    ("torch._functorch.partitioners", "is_opaque_node", "split_joint_graph"),
    ("torch._functorch.partitioners", "functionalize_rng_ops", "split_joint_graph"),
    ("torch._functorch.partitioners", "reordering_to_mimic_autograd_engine", "split_joint_graph"),
    ("torch._functorch.partitioners", "raise_getitems", "split_joint_graph"),
    ("torch._functorch.partitioners", "thread_graphsafe_rng_from_hops", "split_joint_graph"),
    ("torch._functorch.partitioners", "default_partition", "default_partition"),
    ("torch._functorch.partitioners", "min_cut_rematerialization_partition", "min_cut_partition"),
    ("torch._functorch.partitioners", "must_recompute", "checkpoint_policy (the 'recompute' meta key)"),
    ("torch._dynamo.eval_frame", "dynamo_tls", "frames_run_uncompiled"),
    ("torch._dynamo.eval_frame", "reset_skip_reasons", "frames_run_uncompiled"),
    ("torch._dynamo.eval_frame", "get_skip_reasons", "frames_run_uncompiled"),
    ("torch._guards", "detect_fake_mode", "generate_wrapper_code / NodeEmitter"),
    ("torch._guards", "TracingContext", "generate_wrapper_code / compiling_ddp_bucket_graph"),
    ("torch._guards", "tracing", "generate_wrapper_code"),
    ("torch._guards", "CompileContext", "current_frame_id"),
    ("torch._inductor.compile_fx", "compile_fx", "compile_with_inductor"),
    ("torch._inductor.compile_fx", "compile_fx_inner", "_compile_graph_as_planned"),
    ("torch._inductor.compile_fx", "_recursive_post_grad_passes", "generate_wrapper_code"),
    ("torch._inductor.compile_fx", "_recursive_joint_graph_passes", "_inductor_joint_passes"),
    ("torch._inductor.config", "custom_partitioner_fn", "compile_with_inductor"),
    ("torch._inductor.config", "reorder_for_peak_memory", "keep_order_through_inductor"),
    ("torch._inductor.config", "allow_buffer_reuse", "_buffer_reuse_guard"),
    ("torch._inductor.config", "_post_fusion_custom_pass", "_buffer_reuse_guard"),
    ("torch._inductor.config", "fallback_random", "compile_without_codegen"),
    ("torch._inductor.custom_graph_pass", "CustomPartitionerFn", "_Partitioner"),
    ("torch._inductor.custom_graph_pass", "CustomSchedulerPass", "_sizing_pass"),
    ("torch._inductor.memory", "assign_memory_planning_info_for_scheduler_buffers", "_sizing_pass"),
    ("torch._inductor.decomposition", "select_decomp_table", "compile_without_codegen / trace_joint"),
    ("torch._inductor.lowering", "should_fallback_max_pool_with_indices", "trace_joint (decompositions read it)"),
    ("torch._inductor.debug", "DebugContext", "generate_wrapper_code"),
    ("torch._inductor.graph", "GraphLowering", "generate_wrapper_code"),
    ("torch._inductor.ir", "Layout", "generate_wrapper_code"),
    ("torch._inductor.virtualized", "V", "generate_wrapper_code / _sizing_pass"),
    ("torch._inductor.utils", "is_nonfreeable_buffers", "inductor_estimates_input"),
    ("torch._ops", "OpOverload", "overload_packet / is_pointwise / is_random"),
    ("torch._ops", "OpOverloadPacket", "overload_packet"),
    ("torch._subclasses.fake_tensor", "FakeTensor", "UserCodeMode / is_fake"),
    ("torch._subclasses.fake_tensor", "FakeTensorMode", "new_fake_mode"),
    ("torch._subclasses.fake_tensor", "unset_fake_temporarily", "generate_wrapper_code (a symbolic graph at its hints)"),
    ("torch.fx.traceback", "set_current_meta", "UserCodeMode"),
    ("torch.fx.experimental.proxy_tensor", "is_sym_node", "is_symbol / split_joint_graph"),
    ("torch.utils._pytree", "tree_iter", "UserCodeMode / NodeEmitter"),
    ("torch.utils._pytree", "tree_map", "map_nested"),
    ("torch.utils._pytree", "tree_leaves", "nested_leaves"),
]


@pytest.mark.parametrize(
    ("module", "name", "user"), PRIVATE_NAMES, ids=[f"{module}.{name}" for module, name, _ in PRIVATE_NAMES]
)
def test_private_name_exists(module, name, user):
    try:
        found = importlib.import_module(module)
    except ImportError as error:
        pytest.fail(f"torch {torch.__version__} has no module {module} ({error}); update torch_private.{user}")
    assert hasattr(found, name), f"torch {torch.__version__} has no {module}.{name}; update torch_private.{user}"


# The keywords torch_private passes to private functions, by function.
PRIVATE_KEYWORDS = [
    (
        "torch._functorch.partitioners",
        "_extract_fwd_bwd_modules",
        {"saved_sym_nodes", "saved_opaque_nodes", "num_fwd_outputs", "static_lifetime_input_nodes"},
    ),
    ("torch._functorch.partitioners", "_extract_fwd_bwd_outputs", {"num_fwd_outputs"}),
    (
        "torch._functorch.partitioners",
        "min_cut_rematerialization_partition",
        {"compiler", "num_fwd_outputs", "static_lifetime_input_indices"},
    ),
    ("torch._functorch.partitioners", "default_partition", {"num_fwd_outputs", "static_lifetime_input_indices"}),
    ("torch._functorch.partitioners", "cleanup_recompute_tags", {"is_default_partition"}),
    ("torch._functorch.partitioners", "thread_graphsafe_rng_from_hops", {"is_backward"}),
    (
        "torch._functorch.aot_autograd",
        "aot_module_simplified",
        {"fw_compiler", "bw_compiler", "partition_fn", "decompositions"},
    ),
    ("torch._inductor.compile_fx", "compile_fx", {"inner_compile", "config_patches"}),
    ("torch._inductor.compile_fx", "_recursive_post_grad_passes", {"is_inference"}),
    ("torch._inductor.graph", "GraphLowering.__init__", {"example_inputs", "shape_env", "is_inference", "is_backward"}),
    ("torch._subclasses.fake_tensor", "FakeTensorMode.__init__", {"allow_non_fake_inputs"}),
]


@pytest.mark.parametrize(
    ("module", "name", "keywords"), PRIVATE_KEYWORDS, ids=[f"{module}.{name}" for module, name, _ in PRIVATE_KEYWORDS]
)
def test_private_function_takes_the_keywords_we_pass(module, name, keywords):
    function = importlib.import_module(module)
    for attribute in name.split("."):
        function = getattr(function, attribute)
    parameters = inspect.signature(function).parameters
    missing = keywords - set(parameters)
    assert not missing, f"torch {torch.__version__}: {module}.{name} no longer takes {sorted(missing)}"


# ----------------------------------------------------------------------------- joint graphs


class _Step(torch.nn.Module):
    """A training step owning no parameters, as ``trace_joint`` wants it."""

    def forward(self, x, weight):
        hidden = torch.relu(x @ weight)
        return ((hidden * hidden).sum(),)


@pytest.fixture(scope="module")
def traced():
    """A joint graph traced on fake tensors, prepared, and split twice in the tracer's context:
    passing every forward value the backward reads, and by torch's min-cut."""
    mode = torch_private.new_fake_mode()
    args = [torch.randn(8, 4), torch.randn(4, 4, requires_grad=True)]
    fake = [torch_private.to_fake(mode, tensor, torch.device("cpu")) for tensor in args]
    result = {}

    def on_joint(joint_module, joint_inputs, num_fwd_outputs):
        joint = torch_private.prepare_joint_graph(joint_module, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=[])
        backward = set(joint.backward_nodes)
        saved = [n for n in dict.fromkeys((*joint.primals, *joint.forward_nodes)) if any(u in backward for u in n.users)]
        split = torch_private.split_joint_graph(joint, saved)
        result.update(
            joint=joint,
            saved=saved,
            split=split,
            donated=torch_private.backward_donated_inputs(*split, num_fwd_outputs),
            min_cut=torch_private.min_cut_partition(joint, joint_inputs),
        )

    assert torch_private.trace_joint(_Step(), fake, on_joint)
    return types.SimpleNamespace(**result)


def _placeholders(graph_module: fx.GraphModule) -> list[str]:
    return [n.name for n in graph_module.graph.find_nodes(op="placeholder")]


def test_prepare_joint_graph_classifies_the_joint_graph(traced):
    joint = traced.joint
    assert [n.name for n in joint.primals] == ["primals_1", "primals_2"]
    assert [n.name for n in joint.tangents] == ["tangents_1"]
    assert {n.target for n in joint.forward_nodes} >= {aten.mm.default, aten.relu.default}
    assert joint.backward_nodes and torch_private.has_backward(joint)
    assert [n.name for n in joint.backward_outputs] == ["mm_1"]  # the weight's gradient


def test_split_joint_graph_passes_exactly_the_saved_set(traced):
    forward, backward = traced.split
    saved_names = [n.name for n in traced.saved]
    assert _placeholders(forward) == ["primals_1", "primals_2"]
    assert _placeholders(backward) == [*saved_names, "tangents_1"]
    forward_outputs = forward.graph.output_node().args[0]
    assert [n.name for n in forward_outputs[traced.joint.num_fwd_outputs :]] == saved_names


def test_min_cut_partition_splits(traced):
    forward, backward = traced.min_cut
    assert _placeholders(forward) == ["primals_1", "primals_2"]
    assert _placeholders(backward)[-1] == "tangents_1"


def test_backward_donated_inputs_are_saved_tensors(traced):
    _, backward = traced.split
    names = _placeholders(backward)
    # relu's output aliases nothing the forward returns: AOTAutograd donates it.
    assert "relu" in [names[i] for i in traced.donated]
    assert all(names[i] != "tangents_1" and not names[i].startswith("primals") for i in traced.donated)


def test_default_partition_splits():
    graph_module = make_fx(lambda x, t: (torch.relu(x), torch.relu(x) * t))(torch.randn(3), torch.randn(3))
    for node in graph_module.graph.find_nodes(op="placeholder"):
        node.name = node.target = {"x_1": "primals_1", "t_1": "tangents_1"}[node.name]
    graph_module.recompile()
    forward, backward = torch_private.default_partition(
        graph_module, [torch.randn(3), torch.randn(3)], num_fwd_outputs=1, static_lifetime_input_indices=[]
    )
    assert _placeholders(forward) == ["primals_1"] and _placeholders(backward)[-1] == "tangents_1"


def test_trace_joint_reports_a_step_without_backward():
    mode = torch_private.new_fake_mode()
    fake = [torch_private.to_fake(mode, torch.randn(2, 2), torch.device("cpu"))]

    class NoGradient(torch.nn.Module):
        def forward(self, x):
            return (x.sum(),)

    assert torch_private.trace_joint(NoGradient(), fake, lambda *_: pytest.fail("no joint graph expected")) is False


def test_to_fake_keeps_layout_and_makes_meta_tensors_fake():
    mode = torch_private.new_fake_mode()
    real = torch.randn(4, 6).t()
    fake = torch_private.to_fake(mode, real, torch.device("cpu"))
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.device == real.device
    meta = torch.empty(3, 5, device="meta", requires_grad=True)
    fake_meta = torch_private.to_fake(mode, meta, torch.device("cpu"))
    assert fake_meta.device.type == "cpu" and fake_meta.requires_grad and tuple(fake_meta.shape) == (3, 5)


def test_user_code_mode_tags_the_joint_graph_and_sees_stray_meta_tensors():
    stray = []

    class Tagged(torch.nn.Module):
        def forward(self, x, weight):
            with torch_private.UserCodeMode(lambda: {"stack_trace": "model.py:1"}, stray.append):
                return ((x @ weight).sum(),)

    mode = torch_private.new_fake_mode()
    args = [torch.randn(2, 3), torch.randn(3, 3, requires_grad=True)]
    fake = [torch_private.to_fake(mode, tensor, torch.device("cpu")) for tensor in args]
    traces = {}

    def on_joint(joint, _inputs, _num_fwd_outputs):
        traces.update({n.target: n.meta.get("stack_trace") for n in joint.graph.nodes if n.op == "call_function"})

    torch_private.trace_joint(Tagged(), fake, on_joint)
    assert traces[aten.mm.default] == "model.py:1", "AOTAutograd no longer copies fx_traceback's current meta onto nodes"
    with torch_private.UserCodeMode(dict, stray.append):
        torch.empty(2, device="meta") + 1
    assert len(stray) == 1


# ----------------------------------------------------------------------------- op kinds


@pytest.fixture(scope="module")
def ops():
    """Nodes of a small aten graph, by target."""

    def program(x, w, y):
        product = torch.mm(x, w)
        viewed = product.view(-1)
        noise = torch.rand_like(product)
        y.add_(1)
        return torch.relu(viewed).sum() + noise.sum() + torch.sin(product).sum()

    graph_module = make_fx(program)(torch.randn(2, 3), torch.randn(3, 2), torch.randn(2))
    return {n.target: n for n in graph_module.graph.nodes if n.op == "call_function"}


def test_op_kinds_come_from_the_partitioners_op_list(ops):
    assert torch_private.is_view(ops[aten.view.default]) and not torch_private.is_view(ops[aten.relu.default])
    assert torch_private.is_compute_intensive(ops[aten.mm.default])
    assert torch_private.is_fusible(ops[aten.relu.default]) and not torch_private.is_fusible(ops[aten.mm.default])
    assert torch_private.wrapper_allocates(ops[aten.mm.default]) and torch_private.wrapper_allocates(ops[aten.relu.default])


def test_overload_packet_and_pointwise_tag(ops):
    assert torch_private.overload_packet(ops[aten.mm.default]) is aten.mm
    graph = fx.Graph()
    packet_call = graph.call_function(aten.mm, (graph.placeholder("a"), graph.placeholder("b")))
    assert torch_private.overload_packet(packet_call) is aten.mm
    assert torch_private.overload_packet(graph.call_function(max, ())) is None
    assert torch_private.is_pointwise(ops[aten.sin.default]) and not torch_private.is_pointwise(ops[aten.mm.default])


def test_random_mutating_and_ordered_ops(ops):
    noise, write = ops[aten.rand_like.default], ops[aten.add_.Tensor]
    assert torch_private.is_random(noise) and not torch_private.is_random(ops[aten.relu.default])
    assert torch_private.keeps_relative_order(noise) and torch_private.keeps_relative_order(write)
    assert torch_private.is_order_barrier(write) and not torch_private.is_order_barrier(noise)
    assert torch_private.must_stay_in_forward(write) and not torch_private.must_stay_in_forward(noise)


def test_checkpoint_policy_reads_the_key_the_partitioner_reads(ops):
    from torch._functorch import partitioners

    node = ops[aten.relu.default]
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    try:
        assert torch_private.checkpoint_policy(node) == "MUST_RECOMPUTE"
        assert partitioners.must_recompute(node), "torch's partitioner no longer reads node.meta['recompute']"
    finally:
        del node.meta["recompute"]
    assert torch_private.checkpoint_policy(node) is None


def test_pins_are_the_tags_the_partitioner_reads():
    from torch._functorch import partitioners

    graph = fx.Graph()
    forward, backward = graph.call_function(max, ()), graph.call_function(min, ())
    torch_private.pin_to(forward, "forward")
    torch_private.pin_to(backward, "backward")
    assert partitioners._must_be_in_forward(forward) and not partitioners._must_be_in_backward(forward)
    assert partitioners._must_be_in_backward(backward) and not partitioners._must_be_in_forward(backward)
    assert torch_private.is_pinned_to_backward(backward) and not torch_private.is_pinned_to_backward(forward)


def test_symbols_are_sym_nodes():
    graph_module = make_fx(lambda x: x.new_zeros(x.shape[0] * 2), tracing_mode="symbolic")(torch.randn(4))
    kinds = {n.name: torch_private.is_symbol(n) for n in graph_module.graph.nodes if n.op == "call_function"}
    assert any(kinds.values()) and not all(kinds.values())


def test_nested_values_follow_fx_containers():
    nested = (fx.immutable_collections.immutable_list([1, {"a": 2}]), 3)
    assert torch_private.nested_leaves(nested) == [1, 2, 3]
    assert torch_private.map_nested(lambda v: v * 10, nested) == ([10, {"a": 20}], 30)


def test_inductor_estimates_input_matches_inductors_rule():
    from torch._inductor.utils import is_nonfreeable_buffers
    from torch._inductor.virtualized import V

    with V.set_graph_handler(types.SimpleNamespace(name=None)):
        for name in ("primals_1", "arg0_1", "tangents_2", "fwd_rng_state_0", "bwd_rng_state_0", "mm", "getitem_3"):
            expected = not is_nonfreeable_buffers(types.SimpleNamespace(name=name))
            assert torch_private.inductor_estimates_input(name) == expected, name


# ----------------------------------------------------------------------------- graphs we edit


def test_copy_graph_module_and_node_emitter():
    graph_module = make_fx(lambda x: (torch.relu(x),), tracing_mode="fake")(torch.randn(4, 2))
    copy, copy_of = torch_private.copy_graph_module(graph_module)
    assert [n.name for n in copy.graph.nodes] == [n.name for n in graph_module.graph.nodes]
    assert all(copy_of[n].name == n.name for n in graph_module.graph.nodes if n.op != "output")
    relu = next(n for n in copy.graph.nodes if n.target is aten.relu.default)
    emit = torch_private.NodeEmitter(copy.graph, insert_before=relu.next, side="backward")
    doubled = emit(aten.mul.Tensor, relu, 2)
    assert doubled.prev is relu and tuple(doubled.meta["val"].shape) == (4, 2)
    assert torch_private.is_pinned_to_backward(doubled)


def test_mutated_inputs_are_copy_targets():
    graph_module = make_fx(lambda x, y: (x.copy_(y * 2),))(torch.randn(2), torch.randn(2))
    mutated = torch_private.mutated_inputs(types.SimpleNamespace(module=graph_module))
    assert [n.name for n in mutated] == ["x_1"]


# ----------------------------------------------------------------------------- Dynamo and compilation


def test_parameter_names_and_frame_come_from_dynamo():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2))

        def forward(self, x):
            return self.blocks(x)

    seen = {}

    def capture(graph_module, example_inputs):
        seen["names"] = torch_private.parameter_input_names(graph_module, example_inputs)
        seen["frame"] = torch_private.current_frame_id()
        return graph_module.forward

    torch.compile(Model(), backend=capture)(torch.randn(1, 2))
    assert {"blocks.0.weight", "blocks.0.bias"} <= set(seen["names"]), seen["names"]
    assert isinstance(seen["frame"], int) and torch_private.current_frame_id() is None


def test_source_attribute_path():
    source = "L['self']._modules['blocks']._modules['0']._parameters['weight']"
    assert torch_private.source_attribute_path(source) == "blocks.0.weight"
    assert torch_private.source_attribute_path("getattr(getattr(L['self'].layers, '0'), 'mlp')") == "layers.0.mlp"
    assert torch_private.source_attribute_path("L['self'].layers[3].fc1") == "layers.3.fc1"
    assert torch_private.source_attribute_path("G['model'].head") == "head"


def test_compiled_forward_routes_calls():
    compiled = torch.compile(torch.nn.Linear(2, 2))
    assert callable(torch_private.compiled_forward(compiled))
    torch_private.set_compiled_forward(compiled, lambda x: "routed")
    assert compiled(torch.randn(1, 2)) == "routed"


def test_frames_run_uncompiled_names_a_frame_skipped_for_a_graph_break_in_a_loop():
    def looping(x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = x.sin()
            torch._dynamo.graph_break()
        return x

    compiled = torch.compile(looping, backend="eager")
    with torch_private.frames_run_uncompiled() as uncompiled:
        compiled(torch.randn(3))
    assert uncompiled == [f"looping ({__file__}:{looping.__code__.co_firstlineno})"], (
        "Dynamo no longer records a frame it could not compile as torch_private._FAILED_COMPILE_REASONS says"
    )
    with torch_private.frames_run_uncompiled() as uncompiled:
        compiled(torch.randn(3))
    assert uncompiled == []  # the frame is not traced again


def test_written_input_positions_are_batchnorms_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16))
    written = []

    def backend(graph_module, example_inputs):
        compiled = torch_private.compile_without_codegen(graph_module, example_inputs, torch_private.default_partition)
        positions = torch_private.written_input_positions(len(example_inputs))
        written.extend(id(example_inputs[i]) for i in positions)
        return compiled

    torch.compile(model, backend=backend)(torch.randn(4, 8)).sum().backward()
    assert sorted(written) == sorted(map(id, model[1].buffers())), (
        "AOTAutograd no longer leaves TracingContext.fw_metadata.input_info[i].mutates_data as "
        "torch_private.written_input_positions reads it"
    )


def test_one_graph_under_ddp_turns_dynamos_ddp_splitting_off_and_back():
    before = torch._dynamo.config.optimize_ddp
    with torch_private.one_graph_under_ddp():
        assert torch._dynamo.utils.get_optimize_ddp_mode() == "no_optimization"
    assert torch._dynamo.config.optimize_ddp == before


def test_compiling_under_ddp_reads_the_module_ddp_marks_active_around_its_forward():
    from torch.nn.parallel import DistributedDataParallel

    for name in ("_get_active_ddp_module", "_active_ddp_module"):
        assert hasattr(DistributedDataParallel, name), (
            f"torch {torch.__version__} has no DistributedDataParallel.{name}; update torch_private.compiling_under_ddp"
        )
    assert not torch_private.compiling_under_ddp()  # no DDP forward runs
    previous = DistributedDataParallel._active_ddp_module
    DistributedDataParallel._active_ddp_module = object()  # what DDP's _inside_ddp_forward sets
    try:
        assert torch_private.compiling_under_ddp()
    finally:
        DistributedDataParallel._active_ddp_module = previous


def test_compiling_ddp_bucket_graph_reads_the_mark_ddp_splitting_leaves():
    assert not torch_private.compiling_ddp_bucket_graph()
    context = torch._guards.TracingContext(torch_private.new_fake_mode())
    assert context.ddp_optimizer_ctx is None  # DDPOptimizer sets it while it compiles the pieces
    with torch._guards.tracing(context):
        assert not torch_private.compiling_ddp_bucket_graph()
        context.ddp_optimizer_ctx = object()
        assert torch_private.compiling_ddp_bucket_graph()


def test_is_fake_tells_fake_tensors_from_real_ones():
    with torch_private.new_fake_mode():
        fake = torch.empty(2)
    assert torch_private.is_fake(fake)
    assert not torch_private.is_fake(torch.empty(2))


def test_compile_without_codegen_runs_the_partitioned_graphs():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    x = torch.randn(5, 3)
    expected = torch.autograd.grad(model(x).sum(), model[0].weight)[0]
    partitions = []

    def partition(joint, joint_inputs, **kwargs):
        partitions.append(kwargs["num_fwd_outputs"])
        return torch_private.default_partition(joint, joint_inputs, **kwargs)

    compiled = torch.compile(model, backend=lambda gm, inputs: torch_private.compile_without_codegen(gm, inputs, partition))
    actual = torch.autograd.grad(compiled(x).sum(), model[0].weight)[0]
    assert partitions == [1]
    torch.testing.assert_close(actual, expected)


def test_passes_through_dynamo_is_a_shortened_traceback():
    error = torch_private.PassesThroughDynamo("what to do next")
    assert isinstance(error, torch._dynamo.exc.ShortenTraceback) and str(error) == "what to do next"


def test_generate_wrapper_code_leaves_a_symbolic_graph_unguarded():
    """A graph traced for symbolic sizes is lowered as a static copy at its hints: lowering
    it in its own shape environment added guards there (3 here), which specialized the
    compiled graph to the traced shape, and every new size compiled again."""

    def matmul_relu(x, w):
        return (torch.relu(x @ w) * 2,)

    traced = make_fx(matmul_relu, tracing_mode="symbolic")(torch.randn(4, 8), torch.randn(8, 16))
    x = traced.graph.find_nodes(op="placeholder")[0].meta["val"]
    shape_env = x.shape[0].node.shape_env
    guards = len(shape_env.guards)
    code = torch_private.generate_wrapper_code(traced)
    assert len(shape_env.guards) == guards
    assert code.buffer_bytes["buf1"] == 4 * 16 * 4  # sized at the hints


def test_keep_order_marks_the_graph_for_inductor():
    graph_module = make_fx(lambda x: x + 1)(torch.randn(2))
    torch_private.keep_order_through_inductor(graph_module)
    assert graph_module.meta.get(torch_private._KEEP_ORDER_META) is True
    assert torch_private._sizing_pass() is not None, "Inductor lost the hooks that size buffers for reuse"


def test_cpu_allocated_peak_sees_an_allocation():
    size = 1 << 20
    _, peak = torch_private.cpu_allocated_peak(lambda: torch.empty(size, dtype=torch.uint8).fill_(0))
    assert size <= peak < 2 * size, "torch's profiler no longer reports CPU [memory] events in kineto_results"


def test_compiled_at_graph_break_tells_a_graph_that_more_of_its_frame_follows():
    def broken(x: torch.Tensor) -> torch.Tensor:
        x = x.sin()
        torch._dynamo.graph_break()
        return x.cos()

    seen = []

    def backend(graph_module, example_inputs):
        seen.append(torch_private.compiled_at_graph_break(graph_module))
        return graph_module.forward

    torch.compile(broken, backend=backend)(torch.randn(3))
    assert seen == [True, False], (
        "Dynamo no longer records OutputGraph.compile_subgraph_reason.graph_break on the graph it hands a backend, "
        "as torch_private.compiled_at_graph_break reads it"
    )
