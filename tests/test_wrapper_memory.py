"""The replay of Inductor's generated wrapper code (graphopt/cost_models/wrapper_memory.py).

Hand-written wrapper code in the shape Inductor generates: allocations, kernel calls,
buffer reuse, aliasing, multi-output extern kernels, frees and donated inputs. One test
compiles nothing but generates a real graph's wrapper with Inductor and checks the replay
against the allocations a run of the same graph makes.
"""

import ast

import pytest
import torch

from graphopt.cost_models.wrapper_memory import WrapperParseError, storage_bytes, wrapper_timeline

MB = 2**20

WRAPPER = """
class Runner:
    def call(self, args):
        saved, weight, tangent = args
        args.clear()
        buf0 = empty_strided_cpu((256, 1024), (1024, 1), torch.float32)
        cpp_fused_0(saved, tangent, buf0)
        del tangent
        buf1 = empty_strided_cpu((256, 1024), (1024, 1), torch.float32)
        extern_kernels.mm(buf0, weight, out=buf1)
        del buf0
        buf2 = reinterpret_tensor(buf1, (1024, 256), (1, 1024), 0); del buf1  # reuse
        buf3 = torch.ops.aten._flash_backward.default(buf2, saved)
        del saved
        buf4 = buf3[0]
        buf5 = buf3[1]
        del buf3
        del buf5
        del buf2
        return (buf4, )
"""


def test_replay_follows_allocations_reuse_and_frees():
    sizes = {"saved": 1 * MB, "tangent": 4, "buf4": 2 * MB, "buf5": 3 * MB}
    timeline = wrapper_timeline(WRAPPER, sizes, {"saved": "saved", "tangent": "tangent"})
    owned = 1 * MB + 4
    assert timeline[0] == owned  # the inputs it owns; the weight is someone else's
    assert timeline[6] == 3 * MB  # saved, buf0 and buf1 while mm runs (the tangent is gone)
    assert timeline[9] == 2 * MB  # buf1 lives on as buf2 (reused); the tangent and buf0 are gone
    # The extern kernel allocates both its outputs as it runs.
    assert max(timeline) == timeline[10] == 7 * MB  # saved, buf2 and both outputs while it runs
    assert timeline[14] == 6 * MB  # the tuple is gone, the names still hold its outputs
    assert timeline[-1] == 2 * MB  # only the output lives on


def test_inputs_sharing_a_storage_count_once():
    source = "def call(args):\n    a, b = args\n    args.clear()\n    del a\n    del b\n    return ()\n"
    timeline = wrapper_timeline(source, {"a": 8, "b": 8}, {"a": "s", "b": "s"})
    assert timeline[:3] == [8, 8, 8] and timeline[3] == 0


def test_symbolic_allocation_sizes_come_from_the_buffer_table():
    source = "def call(args):\n    s0, = args\n    buf0 = empty_strided_cpu((s0, 4), (4, 1), torch.float32)\n    return (buf0, )\n"
    assert max(wrapper_timeline(source, {"buf0": 96}, {})) == 96


def test_storage_bytes_spans_strides():
    assert storage_bytes((4, 3), (3, 1), torch.float32) == 48
    assert storage_bytes((3, 4), (1, 3), torch.float16) == 24  # transposed: same span
    assert storage_bytes((2, 2), (8, 1), torch.float32) == (8 + 1 + 1) * 4  # a strided slice
    assert storage_bytes((0, 5), (5, 1), torch.float32) == 0


def test_code_without_a_call_function_is_an_error():
    with pytest.raises(WrapperParseError):
        wrapper_timeline("x = 1\n", {}, {})


@pytest.mark.inductor
def test_generated_wrapper_replays_what_the_graph_allocates():
    """Inductor's wrapper for a real forward graph (generated, not compiled), replayed,
    peaks where the same graph run eagerly would: every intermediate is a buffer."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphopt import torch_private

    def forward(x, w):
        h = torch.mm(x, w)
        g = torch.relu(h)
        return (torch.mm(g, w).sum(),)

    graph_module = make_fx(forward, tracing_mode="fake")(torch.randn(512, 256), torch.randn(256, 256))
    code = torch_private.generate_wrapper_code(graph_module)
    timeline = wrapper_timeline(code.source, code.buffer_bytes, {}, code.strides, code.shapes)
    product = 512 * 256 * 4
    # h, then the second product while h (or relu's output written over it) is read: two
    # buffers at most; the scalar sum's buffer is a few bytes.
    assert product <= max(timeline) <= 2 * product + 64


def test_flash_attention_backward_scratch_is_what_the_allocator_sees():
    """The one extern-scratch rule, checked against torch's CPU allocator: CPU flash
    attention's backward allocates a copy of its output gradient unless that is laid out
    batch, sequence, heads, width in memory, and nothing of that size otherwise."""
    from graphopt import torch_private
    from graphopt.cost_models.wrapper_memory import _flash_attention_backward_scratch, _Replay

    batch, heads, sequence, width = 16, 3, 65, 64  # the suite ViT's attention
    q, k, v = (torch.randn(batch, sequence, heads, width).transpose(1, 2) for _ in range(3))
    out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, False)
    outputs = 3 * q.numel() * 4
    source = "f(gradient, q, k, v, out, logsumexp, 0.0, False)"
    call = ast.parse(source).body[0].value
    layouts = [
        torch.randn(batch, sequence, heads, width).transpose(1, 2),  # batch, sequence, heads, width: no copy
        torch.randn(batch, heads, sequence, width),  # contiguous: copied
        torch.randn(sequence, batch, heads, width).permute(1, 2, 0, 3),  # nn.MultiheadAttention's: copied
    ]
    copies = []
    for gradient in layouts:
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
        _, peak = torch_private.cpu_allocated_peak(lambda: backward(gradient, q, k, v, out, logsumexp, 0.0, False))
        replay = _Replay({"gradient": gradient.numel() * 4}, {}, {"gradient": gradient.stride()}, {"gradient": tuple(gradient.shape)})
        predicted = _flash_attention_backward_scratch(replay, call)
        copy_bytes = gradient.numel() * 4
        assert predicted in (0, copy_bytes)
        # What the kernel allocated beyond its three outputs: its copy (if any) and a few
        # small buffers of its own (under a copy's size here).
        assert predicted <= peak - outputs < predicted + copy_bytes
        copies.append(predicted > 0)
    assert copies == [False, True, True]


@pytest.mark.parametrize(
    "batch, channels, size, out_channels, kernel, stride",
    [(16, 128, 4, 128, 3, 2), (16, 64, 16, 128, 1, 2), (16, 16, 16, 16, 3, 1)],  # the suite ResNet's
)
@pytest.mark.parametrize("threads", [1, 2])
def test_convolution_scratch_is_what_the_allocator_sees(batch, channels, size, out_channels, kernel, stride, threads):
    """oneDNN's CPU convolution, forward and backward on channels-last tensors as
    Inductor lays them out and calls them: what the replay holds for each call beyond its
    outputs is what the allocator sees for the same call on real data, within a few
    kilobytes, on whatever instruction set this machine has and at each thread count
    (oneDNN's scratch is per thread: 65,536 bytes on one, 106,752 on two for the 1x1
    stride-2 backward on an AVX2 machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_convolution_scratch(batch, channels, size, out_channels, kernel, stride)
    finally:
        torch.set_num_threads(before)


def _check_convolution_scratch(batch, channels, size, out_channels, kernel, stride):
    from graphopt import torch_private
    from graphopt.cost_models.wrapper_memory import _Replay


    channels_last = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    x = channels_last(torch.randn(batch, channels, size, size))
    w = channels_last(torch.randn(out_channels, channels, kernel, kernel))
    padding = kernel // 2
    conv = lambda: torch.ops.aten.convolution.default(x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1)  # noqa: E731
    out, forward_peak = torch_private.cpu_allocated_peak(conv)
    gradient = channels_last(torch.randn_like(out))
    backward = lambda: torch.ops.aten.convolution_backward.default(  # noqa: E731
        gradient, x, w, [0], [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [True, True, False]
    )
    grads, backward_peak = torch_private.cpu_allocated_peak(backward)
    tensors = {"x": x, "w": w, "g": gradient}
    replay = _Replay(
        {name: t.numel() * 4 for name, t in tensors.items()},
        {},
        {name: t.stride() for name, t in tensors.items()},
        {name: tuple(t.shape) for name, t in tensors.items()},
        "cpu",
        {name: t.dtype for name, t in tensors.items()},
        probe=True,
    )
    forward_call = (
        f"buf0 = extern_kernels.convolution(x, w, None, stride=({stride}, {stride}), padding=({padding}, {padding}), "
        "dilation=(1, 1), transposed=False, output_padding=(0, 0), groups=1)"
    )
    backward_call = (
        f"buf1 = torch.ops.aten.convolution_backward.default(g, x, w, [0], ({stride}, {stride}), ({padding}, {padding}), "
        "(1, 1), False, (0, 0), 1, [True, True, False])"
    )
    forward_scratch = forward_peak - out.numel() * 4
    backward_scratch = backward_peak - sum(g.numel() * 4 for g in grads if g is not None)
    assert abs(forward_scratch - replay.scratch(ast.parse(forward_call).body[0])) <= 16_384
    assert abs(backward_scratch - replay.scratch(ast.parse(backward_call).body[0])) <= 32_768


def test_convolution_scratch_falls_back_to_the_rule_where_the_call_is_not_run():
    """A call the replay may not run (a graph planned for another machine: a GPU plan
    traced on CPU tensors), or whose arguments it cannot make (a symbolic size), takes
    the rule measured on one machine: twice the weight's bytes backward."""
    from graphopt.cost_models.wrapper_memory import _Replay

    shapes = {"g": (4, 250, 4, 4), "x": (4, 1, 4, 4), "w": (250, 1, 1, 1)}
    strides = {name: torch.empty(shape).stride() for name, shape in shapes.items()}
    sizes = {name: 4 * torch.empty(shape).numel() for name, shape in shapes.items()}
    dtypes = dict.fromkeys(shapes, torch.float32)
    call = "buf1 = torch.ops.aten.convolution_backward.default(g, x, w, [0], (1, 1), (0, 0), (1, 1), False, (0, 0), {}, [True, True, False])"
    elsewhere = _Replay(sizes, {}, strides, shapes, "cpu", dtypes, probe=False)
    assert elsewhere.scratch(ast.parse(call.format(1)).body[0]) == 2000
    symbolic = _Replay(sizes, {}, strides, shapes, "cpu", dtypes, probe=True)
    assert symbolic.scratch(ast.parse(call.format("s0")).body[0]) == 2000


def test_returned_names_and_strides_read_the_wrappers_return():
    """The buffer each output is, and its strides: a name's from the table, a view's its own."""
    from graphopt.cost_models.wrapper_memory import returned_names, returned_strides

    source = (
        "def call(args):\n"
        "    a, b = args\n"
        "    buf0 = empty_strided_cpu((4, 4), (1, 4), torch.float32)\n"
        "    return (buf0, a, reinterpret_tensor(buf0, (16, ), (1, ), 0), None, )\n"
    )
    assert returned_names(source) == ["buf0", "a", "buf0", None]
    assert returned_strides(source, {"buf0": (1, 4), "a": (4, 1)}) == [(1, 4), (4, 1), (1,), None]
