"""graphopt leaves the process as it found it: the solver prints nothing and touches no
file descriptor; offload copies, optimizer hooks and backend sessions belong to one
compiled model and go with it."""

import copy
import functools
import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_pre_hooks
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import graphopt
from graphopt import backend as backend_module
from graphopt.ops import offload as offload_ops
from graphopt.solver import least_peak, solve
from graphopt.trainable import FrozenRowsGuard

from conftest import REPO_ROOT, assert_grads_equal, training_step
from test_solver import chain_problem

MB = 2**20


# ----------------------------------------------------------------------------- solver


def test_solving_prints_nothing_and_leaves_stdout_alone(capfd):
    redirected = []
    real_dup2 = os.dup2
    os.dup2 = lambda *args, **kwargs: redirected.append(args) or real_dup2(*args, **kwargs)
    try:
        assert solve(chain_problem(30 * MB)) is not None
        assert least_peak(chain_problem(None)) is not None
    finally:
        os.dup2 = real_dup2
    assert redirected == [], "the solver redirected a file descriptor"
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_a_fresh_process_solving_prints_nothing():
    """HiGHS's banner comes once per process, so only a fresh one shows it."""
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        from test_solver import chain_problem
        from graphopt.solver import solve
        assert solve(chain_problem(30 * 2**20)) is not None
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


# ----------------------------------------------------------------------------- offload


def test_a_copy_event_travels_with_its_tensor_not_its_address():
    buffer = torch.empty(16)
    view = buffer.view(4, 4)  # same data pointer, another tensor
    offload_ops.attach_copy_event(buffer, "event of buffer")
    assert offload_ops.take_copy_event(view) is None
    assert offload_ops.take_copy_event(buffer) == "event of buffer"
    assert offload_ops.take_copy_event(buffer) is None  # taken once


def test_a_freed_tensors_event_goes_with_it():
    tensor = torch.empty(1024)
    address = tensor.data_ptr()
    offload_ops.attach_copy_event(tensor, "stale")
    del tensor
    reused = [torch.empty(1024) for _ in range(8)]
    assert all(offload_ops.take_copy_event(t) is None for t in reused)
    assert address  # the old address may be reused; nothing is keyed by it


def _offload_matmuls(ctx, op, *args, **kwargs):
    if op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
        return CheckpointPolicy.MUST_CPU_OFFLOAD
    return CheckpointPolicy.PREFER_SAVE


class _Offloading(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))

    def forward(self, x):
        context = functools.partial(create_selective_checkpoint_contexts, _offload_matmuls)
        return checkpoint(self.block, x, use_reentrant=False, context_fn=context).square().mean()


def test_two_models_offloading_at_once_keep_their_own_copies():
    """Both forwards, then both backwards in the other order: each gets its own tensors."""
    torch.manual_seed(0)
    eager_a, eager_b = _Offloading(), _Offloading()
    ours_a, ours_b = copy.deepcopy(eager_a), copy.deepcopy(eager_b)
    compiled_a = graphopt.compile(ours_a, compiler="eager")
    compiled_b = graphopt.compile(ours_b, compiler="eager")
    x_a, x_b = torch.randn(64, 32), torch.randn(64, 32)
    loss_a, loss_b = compiled_a(x_a), compiled_b(x_b)
    loss_b.backward()
    loss_a.backward()
    training_step(eager_a, (x_a,))
    training_step(eager_b, (x_b,))
    assert_grads_equal(eager_a, ours_a)
    assert_grads_equal(eager_b, ours_b)
    assert any(d.action == "offload" for d in graphopt.plans(compiled_a)[0].decisions)
    assert not any(isinstance(value, dict) and value for name, value in vars(offload_ops).items() if name != "_side_streams" and not name.startswith("__"))


# ----------------------------------------------------------------------------- optimizer hooks


def test_the_frozen_rows_hook_goes_with_its_guard():
    gc.collect()
    before = len(_global_optimizer_pre_hooks)
    parameter = nn.Parameter(torch.ones(4, 4))
    guard = FrozenRowsGuard()
    guard.add([])
    assert len(_global_optimizer_pre_hooks) == before  # nothing to guard, no hook
    guard.add([parameter])
    assert len(_global_optimizer_pre_hooks) == before + 1
    parameter.grad = torch.zeros_like(parameter)
    decayed = torch.optim.SGD([parameter], lr=0.1, weight_decay=0.1)
    with pytest.raises(graphopt.GraphoptError, match="weight_decay=0"):
        decayed.step()
    del guard
    gc.collect()
    assert len(_global_optimizer_pre_hooks) == before
    decayed.step()  # nobody guards it any more


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).square().mean()


def test_a_compiled_models_hook_is_removed_with_it():
    gc.collect()
    before = len(_global_optimizer_pre_hooks)
    model = _Stack()
    compiled = graphopt.compile(model, compiler="eager", trainable={"up.weight": 0.5, "down.*": 1.0})
    training_step(compiled, (torch.randn(8, 16),))
    assert len(_global_optimizer_pre_hooks) == before + 1
    with pytest.raises(graphopt.GraphoptError, match="weight_decay=0"):
        torch.optim.AdamW(model.parameters(), weight_decay=0.1).step()
    del compiled, model
    torch._dynamo.reset()  # Dynamo, not the model, holds the compiled graphs and their backend
    gc.collect()
    assert len(_global_optimizer_pre_hooks) == before


# ----------------------------------------------------------------------------- backend registry


def test_backend_sessions_go_with_their_graphs():
    """(Dynamo can leave a compiled graph behind in a model module's globals when a
    compilation fails part way, which keeps that graph's entry: only this test's counts.)"""
    gc.collect()
    before = len(backend_module._SESSIONS_BY_OPTIONS)
    options = {"compiler": "eager"}
    compiled = torch.compile(_Stack(), backend="graphopt", options=options)
    training_step(compiled, (torch.randn(8, 16),))
    session = backend_module.session_for_options(options)
    assert session is not None and len(session.plans) == 1
    assert len(backend_module._SESSIONS_BY_OPTIONS) == before + 1
    training_step(compiled, (torch.randn(8, 16),))  # the same graphs, the same session
    assert backend_module.session_for_options(options) is session
    del compiled, session
    torch._dynamo.reset()
    gc.collect()
    assert backend_module.session_for_options(options) is None
    assert len(backend_module._SESSIONS_BY_OPTIONS) <= before
