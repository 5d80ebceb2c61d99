"""Chunked head + cross-entropy (issue 19) on a Hugging Face Llama whose logits are its
largest tensor: least reachable peaks with and without chunking, per-block
checkpointing's measured peak, and graphopt at its least chunked budget beside
``torch.compile`` and a hand-written chunked loss (the Liger / Unsloth recipe).

    MALLOC_MMAP_THRESHOLD_=65536 python -m bench.chunked_loss [--quick]

Peaks are the allocator's (``measure_peak(cpu_method="allocated")``) plus what is
resident before the step (parameters, inputs), gradients allocated anew each step.
Times: median of timed steps after a warm-up, each configuration in this process.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import graphopt
import graphopt.chunking
from graphopt.errors import BudgetInfeasibleError
from graphopt.ops.chunked_cross_entropy import chunk_bounds
from graphopt.plan import format_chunking


class LossOf(nn.Module):
    """The Hugging Face model called with its labels; returns only the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=labels).loss


class HandChunkedLoss(nn.Module):
    """The same model with the loss written by hand the way Liger Kernel and Unsloth do
    it: the backbone's hidden states, then per chunk of tokens the logits, the loss and
    the gradients (computed in the forward), the weight's gradient summed over chunks."""

    def __init__(self, model: nn.Module, chunks: int):
        super().__init__()
        self.model = model
        self.chunks = chunks

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model(input_ids=input_ids).last_hidden_state
        shifted = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        return _HandChunked.apply(hidden.reshape(-1, hidden.shape[-1]), self.model.lm_head.weight, shifted.reshape(-1), self.chunks)


class _HandChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunks):  # type: ignore[override]
        valid = labels != -100
        count = valid.sum()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = hidden.new_zeros(())
        for start, stop in chunk_bounds(hidden.shape[0], chunks):
            logits = hidden[start:stop] @ weight.t()
            target = labels[start:stop]
            total = total + nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            gradient = torch.softmax(logits, dim=1)
            rows = torch.arange(stop - start)
            gradient[rows, target.clamp(min=0)] -= 1
            gradient *= valid[start:stop].unsqueeze(1) / count
            grad_hidden[start:stop] = gradient @ weight
            grad_weight += gradient.t() @ hidden[start:stop]
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad, grad_weight * grad, None, None


def build(quick: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    batch, seq, vocab, hidden = (2, 256, 8000, 64) if quick else (4, 1024, 32000, 256)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=seq, attention_dropout=0.0, use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.train()
    ids = torch.randint(0, vocab, (batch, seq))
    return model, (ids, ids.clone())


def measure(step_model: nn.Module, inputs, *, steps: int) -> dict:
    """A warmed-up step's measured peak (allocator + resident parameters and inputs) and the median step time."""
    parameters = [p for p in step_model.parameters()]

    def step() -> float:
        for p in parameters:
            p.grad = None
        loss = step_model(*inputs)
        loss.backward()
        return loss.item()

    step()
    for p in parameters:
        p.grad = None
    loss, peak = graphopt.measure_peak(step, device="cpu", cpu_method="allocated")
    resident = sum(t.numel() * t.element_size() for t in [*{id(p): p for p in parameters}.values(), *inputs])
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    grads = [p.grad.detach().clone() for p in parameters]
    return {"peak": peak.peak_bytes + resident, "ms": statistics.median(times) * 1e3, "loss": loss, "grads": grads}


def least_peak(model: nn.Module, inputs, *, chunk: bool) -> BudgetInfeasibleError:
    """The error graphopt raises at a 1-byte budget: its least reachable peak."""
    saved = graphopt.chunking.CHUNK_COUNTS
    graphopt.chunking.CHUNK_COUNTS = saved if chunk else ()
    try:
        torch._dynamo.reset()
        compiled = graphopt.compile(copy.deepcopy(model), memory_budget=1)
        compiled(*inputs).backward()
    except BudgetInfeasibleError as error:
        return error
    finally:
        graphopt.chunking.CHUNK_COUNTS = saved
    raise AssertionError("a 1-byte budget was met")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    hf, inputs = build(args.quick)
    model = LossOf(hf)
    rows = {}

    def report(name: str, result: dict) -> None:
        rows[name] = {k: v for k, v in result.items() if k != "grads"}
        print(json.dumps({name: rows[name]}), flush=True)

    eager = measure(copy.deepcopy(model), inputs, steps=1)
    report("eager", eager)
    unchunked = least_peak(model, inputs, chunk=False)
    report("graphopt least peak, no chunking", {"peak": unchunked.least_peak_bytes, "budget": unchunked.least_budget_bytes})
    chunked = least_peak(model, inputs, chunk=True)
    report("graphopt least peak, chunking", {"peak": chunked.least_peak_bytes, "budget": chunked.least_budget_bytes})

    checkpointed = copy.deepcopy(hf)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report("eager, per-block checkpointing", measure(LossOf(checkpointed), inputs, steps=1))

    torch._dynamo.reset()
    report("torch.compile", measure(torch.compile(copy.deepcopy(model)), inputs, steps=args.steps))

    torch._dynamo.reset()
    target = copy.deepcopy(model)
    compiled = graphopt.compile(target, memory_budget=chunked.least_budget_bytes)
    result = measure(compiled, inputs, steps=args.steps)
    (plan,) = graphopt.plans(compiled)
    chunks = max((c.chunks for c in plan.chunking), default=1)
    result["grads_max_abs_difference_vs_eager"] = max((a - b).abs().max().item() for a, b in zip(result["grads"], eager["grads"]))
    result["chunking"] = [format_chunking(c).strip() for c in plan.chunking]
    report(f"graphopt at {chunked.least_budget_bytes} B", result)

    torch._dynamo.reset()
    hand = torch.compile(HandChunkedLoss(copy.deepcopy(hf), chunks))
    report(f"torch.compile, hand-chunked loss x{chunks}", measure(hand, inputs, steps=args.steps))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
