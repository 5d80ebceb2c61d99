"""Cost models on tiny traced graphs: FLOPs, bytes moved, roofline, hardware profiles, timing cache."""

from __future__ import annotations

import json

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.cost_models import (
    PROFILES,
    HardwareProfile,
    MeasuredCostModel,
    OpCost,
    estimate_node_cost,
    get_hardware,
    local_cpu_profile,
    node_bytes_moved,
    node_dtype,
    node_flops,
    profile_for_device_name,
    roofline_ms,
)
from graphopt.errors import HardwareError

FLOAT32_BYTES = 4


def trace(function, *inputs, tracing_mode="fake"):
    return make_fx(function, tracing_mode=tracing_mode)(*inputs)


def nodes_by_target(graph_module, target):
    return [node for node in graph_module.graph.nodes if node.target == target]


def only_node(graph_module, target):
    (node,) = nodes_by_target(graph_module, target)
    return node


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_mm_flops_are_two_m_n_k(tracing_mode):
    m, k, n = 6, 10, 3
    graph_module = trace(torch.mm, torch.randn(m, k), torch.randn(k, n), tracing_mode=tracing_mode)
    assert node_flops(only_node(graph_module, torch.ops.aten.mm.default)) == 2 * m * n * k


def test_cpu_flash_attention_counts_its_matmuls_forward_and_backward():
    """torch has no flop formula for CPU flash attention; without ours, recomputing an
    attention output looked free and a bench GPT plan that did so ran 11% slower."""
    from torch.nn.functional import scaled_dot_product_attention

    batch, heads, seq, head_dim = 2, 4, 64, 16

    def attention_step(q, k, v):
        out = scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out.sum(), (q, k, v))

    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    graph_module = trace(attention_step, q, k, v)
    two_matmuls = 2 * (2 * batch * heads * seq * seq * head_dim)
    forward = only_node(graph_module, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)
    backward = only_node(graph_module, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    assert node_flops(forward) == two_matmuls
    assert node_flops(backward) == 2.5 * two_matmuls  # torch's count for the flash backward


def test_nodes_without_flop_formula_or_tensors_count_zero():
    def function(x):
        values = torch.ops.aten.var_mean(x, [1])  # tuple output, picked by getitem
        return values[0] + x.shape[0], x.relu()

    graph_module = trace(function, torch.randn(4, 5), tracing_mode="symbolic")
    for node in graph_module.graph.nodes:  # placeholders, symints, getitem, output: no crash
        assert node_flops(node) == 0
        assert node_bytes_moved(node) >= 0
        assert estimate_node_cost(node, PROFILES["h100"]).ms >= 0


def test_node_with_missing_meta_costs_nothing():
    graph_module = trace(torch.mm, torch.randn(2, 3), torch.randn(3, 4))
    node = only_node(graph_module, torch.ops.aten.mm.default)
    for argument in node.args:
        argument.meta.pop("val")
    node.meta.pop("val")
    assert node_flops(node) == 0
    assert node_bytes_moved(node) == 0


def test_views_move_no_bytes():
    def function(x):
        return x.view(8, 4).t().unsqueeze(0).expand(2, 4, 8)[0].transpose(0, 1)

    graph_module = trace(function, torch.randn(4, 8))
    computing = [node for node in graph_module.graph.nodes if node.op == "call_function"]
    assert computing
    assert all(node_bytes_moved(node) == 0 for node in computing)


def test_reshape_moves_bytes_only_when_it_copies():
    x = torch.randn(4, 8)
    view_module = trace(lambda t: torch.ops.aten.reshape(t, (32,)), x)
    copy_module = trace(lambda t: torch.ops.aten.reshape(t.t(), (32,)), x)
    assert node_bytes_moved(only_node(view_module, torch.ops.aten.view.default)) == 0
    copying = [node for node in copy_module.graph.nodes if node_bytes_moved(node) > 0]
    assert sum(node_bytes_moved(node) for node in copying) == 2 * x.numel() * FLOAT32_BYTES


def test_pointwise_add_reads_two_and_writes_one():
    shape = (16, 32)
    graph_module = trace(torch.add, torch.randn(shape), torch.randn(shape))
    numel = shape[0] * shape[1]
    assert node_bytes_moved(only_node(graph_module, torch.ops.aten.add.Tensor)) == 3 * numel * FLOAT32_BYTES


def test_dtype_is_first_floating_input():
    graph_module = trace(lambda x, w: torch.mm(x, w), torch.randn(2, 3, dtype=torch.bfloat16),
                         torch.randn(3, 4, dtype=torch.bfloat16))
    assert node_dtype(only_node(graph_module, torch.ops.aten.mm.default)) == torch.bfloat16


def test_roofline_takes_the_slower_of_compute_and_memory():
    hardware = HardwareProfile(
        name="toy", device_type="cpu", memory_bytes=1, peak_flops_per_s={"float32": 1e9},
        memory_bandwidth_bytes_per_s=1e9, host_link_bytes_per_s=1e9, kernel_overhead_ms=0.5, source="test",
    )
    compute_bound_ms = roofline_ms(2e6, 1e3, torch.float32, hardware)
    memory_bound_ms = roofline_ms(1e3, 3e6, torch.float32, hardware)
    assert compute_bound_ms == pytest.approx(2.0 + 0.5)
    assert memory_bound_ms == pytest.approx(3.0 + 0.5)
    assert roofline_ms(0, 0, torch.float32, hardware) == 0


def test_estimate_node_cost_uses_dtype_peak():
    m = n = k = 512
    graph_module = trace(torch.mm, torch.randn(m, k, dtype=torch.float16), torch.randn(k, n, dtype=torch.float16))
    hardware = PROFILES["h100"]
    cost = estimate_node_cost(only_node(graph_module, torch.ops.aten.mm.default), hardware)
    assert cost.flops == 2 * m * n * k
    assert cost.bytes_moved == 3 * m * n * 2
    expected_ms = max(cost.flops / 989.5e12, cost.bytes_moved / hardware.memory_bandwidth_bytes_per_s) * 1e3
    assert cost.ms == pytest.approx(expected_ms + hardware.kernel_overhead_ms)


def test_missing_dtype_falls_back_to_float32():
    hardware = PROFILES["a100"]
    assert hardware.flops_per_s(torch.float8_e4m3fn) == hardware.flops_per_s(torch.float32)
    assert hardware.flops_per_s(torch.float64) == hardware.flops_per_s(torch.float32)
    assert PROFILES["h100"].flops_per_s(torch.float8_e5m2) == 1979e12


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_by_name_any_case_and_json_round_trip(name, tmp_path):
    profile = get_hardware(name.upper())
    assert profile is get_hardware(name) is PROFILES[name]
    assert HardwareProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(profile.to_json()))
    assert get_hardware(str(path)) == profile


def test_unknown_name_lists_accepted_names():
    with pytest.raises(HardwareError) as error:
        get_hardware("tpu-v9")
    assert all(name in str(error.value) for name in PROFILES)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"memory_bytes": "lots"}, "memory_bytes"),
        ({"device_type": "tpu"}, "device_type"),
        ({"peak_flops_per_s": {"bfloat16": 1e12}}, "float32"),
        ({"peak_flops_per_s": {"float32": "fast"}}, "peak_flops_per_s"),
        ({"memory_bytes": True}, "memory_bytes"),
        ({"kernel_overhead_ms": -1}, "kernel_overhead_ms"),
        ({"memory_bandwitdh": 1}, "memory_bandwitdh"),
    ],
)
def test_bad_json_field_is_named(change, words):
    data = {**PROFILES["l4"].to_json(), **change}
    with pytest.raises(HardwareError, match=words):
        HardwareProfile.from_json(data)


def test_missing_json_field_is_named():
    data = PROFILES["l4"].to_json()
    del data["host_link_bytes_per_s"]
    with pytest.raises(HardwareError, match="host_link_bytes_per_s"):
        HardwareProfile.from_json(data)


def test_auto_is_the_local_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    profile = get_hardware("auto")
    assert profile is get_hardware(None) is local_cpu_profile()
    assert profile.device_type == "cpu" and profile.memory_bytes > 0
    assert "this machine" in profile.source


def test_device_names_map_to_closest_profile():
    memory_bytes = 40 * 2**30
    a100_40gb = profile_for_device_name("NVIDIA A100-SXM4-40GB", memory_bytes)
    assert a100_40gb.peak_flops_per_s == PROFILES["a100"].peak_flops_per_s
    assert a100_40gb.memory_bytes == memory_bytes
    assert profile_for_device_name("NVIDIA GeForce RTX 4090", memory_bytes).name == "rtx4090"
    assert profile_for_device_name("NVIDIA L4", memory_bytes).name == "l4"
    with pytest.raises(HardwareError, match="no hardware profile for this GPU .*NVIDIA L40S"):
        profile_for_device_name("NVIDIA L40S", memory_bytes)  # tests/test_fallbacks.py: the whole message


def test_measured_model_times_mm_once_and_reads_cache(tmp_path, monkeypatch):
    graph_module = trace(torch.mm, torch.randn(32, 16), torch.randn(16, 8))
    node = only_node(graph_module, torch.ops.aten.mm.default)
    cache_path = tmp_path / "op_times.json"
    hardware = local_cpu_profile()

    timed_calls = []
    original = MeasuredCostModel._time_node
    monkeypatch.setattr(MeasuredCostModel, "_time_node", lambda self, n: timed_calls.append(n) or original(self, n))

    first = MeasuredCostModel(hardware, cache_path=str(cache_path), repeats=2).node_cost(node)
    assert isinstance(first, OpCost) and first.ms > 0 and first.flops == 2 * 32 * 16 * 8
    assert len(timed_calls) == 1 and cache_path.exists()

    second_model = MeasuredCostModel(hardware, cache_path=str(cache_path), repeats=2)
    assert second_model.node_cost(node) == first
    assert len(timed_calls) == 1


def test_measured_model_falls_back_to_estimate_when_op_fails(tmp_path):
    # randn probabilities are negative somewhere, which multinomial rejects.
    graph_module = trace(lambda probabilities: torch.multinomial(probabilities, 1), torch.rand(3, 64))
    node = only_node(graph_module, torch.ops.aten.multinomial.default)
    hardware = local_cpu_profile()
    model = MeasuredCostModel(hardware, cache_path=str(tmp_path / "cache.json"), repeats=1)
    assert model.node_cost(node) == estimate_node_cost(node, hardware)
    assert not (tmp_path / "cache.json").exists()


def test_measured_model_gives_index_ops_in_range_indices(tmp_path):
    def function(weight, indices):
        return torch.nn.functional.embedding(indices, weight)

    graph_module = trace(function, torch.randn(7, 3), torch.zeros(5, dtype=torch.long))
    node = only_node(graph_module, torch.ops.aten.embedding.default)
    model = MeasuredCostModel(local_cpu_profile(), cache_path=str(tmp_path / "cache.json"), repeats=1)
    model.node_cost(node)
    assert len(json.loads((tmp_path / "cache.json").read_text())["ms_by_key"]) == 1


# ----------------------------------------------------------------------------- memory


def test_multi_output_extern_op_allocates_every_output_while_its_inputs_live():
    """topk is no pointwise op: its outputs are its own allocations even when only
    pointwise ops read them, and they exist before its input is freed (flash
    attention's backward is the same shape, and missing it hid 2.4 MB on a ViT)."""
    from graphopt.cost_models.memory import graph_timeline

    def function(x):
        doubled = x * 2
        values, indices = torch.topk(doubled, 32)
        return values + 1, indices

    graph_module = trace(function, torch.randn(1024, 64))
    doubled, values, indices = 1024 * 64 * FLOAT32_BYTES, 1024 * 32 * FLOAT32_BYTES, 1024 * 32 * 8
    timeline = graph_timeline(graph_module)
    assert max(timeline) == doubled + values + indices
    topk_step = [node.target for node in graph_module.graph.nodes].index(torch.ops.aten.topk.default)
    assert timeline[topk_step] == doubled + values + indices
    assert timeline[-1] == indices + values  # doubled and values freed; values + 1 out


def test_a_stored_pointwise_node_is_written_by_its_producers_kernel():
    """Inductor fuses `doubled` into the kernel that writes the concatenation; both are
    stored (the matmul reads one, the other is a real cat buffer), so both exist from
    that kernel on (the measured GPT backward peaked there, 3 MB above the simulation)."""
    from graphopt.cost_models.memory import graph_timeline

    def function(a, b, weight):
        joined = torch.cat([a, b])
        doubled = joined * 2
        return doubled @ weight

    graph_module = trace(function, torch.randn(256, 64), torch.randn(256, 64), torch.randn(64, 32))
    joined = doubled = 512 * 64 * FLOAT32_BYTES
    timeline = graph_timeline(graph_module)
    cat_step = [node.target for node in graph_module.graph.nodes].index(torch.ops.aten.cat.default)
    assert timeline[cat_step] == joined + doubled
    assert max(timeline) == joined + doubled


def test_a_pointwise_node_does_not_join_a_kernel_that_runs_before_its_other_inputs():
    """`summed` reads the stored `doubled` and a later matmul's result: no kernel can
    write it before that matmul ran, so it is not allocated with `doubled`. (Chaining it
    in anyway put every residual-stream gradient of a GPT's backward at its first
    layer's step: 34 MB too many on the bench GPT.)"""
    from graphopt.cost_models.memory import graph_timeline

    def function(x, weight):
        doubled = x * 2
        summed = doubled + doubled @ weight
        return summed @ weight

    graph_module = trace(function, torch.randn(256, 64), torch.randn(64, 64))
    one = 256 * 64 * FLOAT32_BYTES
    targets = [node.target for node in graph_module.graph.nodes]
    timeline = graph_timeline(graph_module)
    assert timeline[targets.index(torch.ops.aten.mul.Tensor)] == one  # doubled alone
    # doubled and the first product; summed is written over doubled, which dies in its kernel
    assert max(timeline) == 2 * one


def test_a_dead_buffer_held_for_reuse_counts_until_it_is_reused():
    """Inductor's wrapper keeps a dead buffer for a later one of its size when its own
    estimate says holding it fits under its estimated peak. That estimate misses in-place
    writes (`grown` is written over `product`, yet counted beside it), so the hold can
    rise above the peak without it: the generated GPT backward kept a recomputed 16.8 MB
    buffer dead across an attention backward, 9% above the simulation that ignored it."""
    from graphopt.cost_models.memory import graph_timeline

    def function(x, weight, narrow, square):
        product = x @ weight
        grown = product + 1  # written over `product`, which dies here
        half = grown @ narrow  # `grown` dies here: the wrapper pools its buffer
        other = half @ square
        again = x @ weight  # `grown`'s size: the wrapper reuses it, held since `half`
        return again, other

    graph_module = trace(function, torch.randn(256, 64), torch.randn(64, 64), torch.randn(64, 32), torch.randn(32, 32))
    full, half = 256 * 64 * FLOAT32_BYTES, 256 * 32 * FLOAT32_BYTES
    timeline = graph_timeline(graph_module)
    targets = [node.target for node in graph_module.graph.nodes]
    add_step = targets.index(torch.ops.aten.add.Tensor)
    assert timeline[add_step] == full  # in place: `product` and `grown` share one buffer
    other_step = [i for i, target in enumerate(targets) if target == torch.ops.aten.mm.default][2]
    assert timeline[other_step] == full + 2 * half  # `half`, `other` and the held buffer
    assert max(timeline) == full + 2 * half
