"""Per-rank peak and step time under DDP and FSDP2: torch's ways to save memory against graphopt at their peaks.

    cd <repo root> && python -m bench.distributed [--wraps ddp,fsdp] [--steps 10] [--warmup 2] \\
        [--batch 4] [--seq 512] [--compiler inductor] [--out bench/results/distributed.csv]

Two ranks on CPU with the gloo backend (``torch.multiprocessing``, one thread each), a
fresh pair of processes for each wrap, each with an Inductor cache of its own. Model:
``examples.gpt`` at its defaults (4 layers, d 256, 4 heads, vocab 2048: the frontier
bench's GPT), ``--batch`` x ``--seq`` tokens per rank (rank r's drawn with seed r), fp32.

Wraps:
  ddp   ``DistributedDataParallel(model)`` (torch's default 25 MB buckets)
  fsdp  ``fully_shard`` on every block, then on the whole model (torchtitan's layout)

Configurations, each on its own copy of the same weights, wrapped, in the same processes:
  compile               ``torch.compile(wrapped)``
  torch-amb-0.5         the same with ``activation_memory_budget = 0.5`` held while it compiles
  checkpoint-full       every block under non-reentrant ``torch.utils.checkpoint``, then
                        ``torch.compile``
  graphopt-at-<config>  ``graphopt.compile(wrapped, memory_budget=<config's peak>)`` for
                        torch-amb-0.5 and checkpoint-full: the larger of the two ranks'
                        measured peaks

A rank's peak is what the CPU allocator handed out during one step above what it held
before (``graphopt.measure_peak(cpu_method="allocated")``, the profiler's record of every
allocation, so glibc's default allocator serves the steps; after ``--warmup`` steps: DDP
rebuilds its buckets at the start of the second),
plus what the rank held for the model before the step (its parameters or FSDP2 shards,
buffers and DDP's gradient buckets: ``graphopt.rank_memory``) and the inputs: what a
per-rank ``memory_budget`` counts. Step time: ``--steps`` rounds of one step of every
configuration, the order reversed every other round (both ranks step together: each
collective waits for the other); the median per configuration on rank 0, and for a
graphopt row its ratio to the torch configuration at whose peak it ran, timed beside it.
Each configuration's loss and gradients are compared with ``compile``'s (same weights,
same tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MEGABYTE = 1_000_000
WORLD_SIZE = 2
WRAPS = ("ddp", "fsdp")
TORCH_CONFIGS = ("compile", "torch-amb-0.5", "checkpoint-full")
AT_CONFIGS = ("torch-amb-0.5", "checkpoint-full")  # graphopt runs at each one's measured peak
FIELDS = [
    "wrap", "config", "budget_mb", "rank0_mb", "rank1_mb", "predicted_mb", "median_ms", "x_time", "vs",
    "loss_vs_compile", "gradient_vs_compile", "first_step_s", "error",
]


# ----------------------------------------------------------------------------- one rank


def _wrapped(base: nn.Module, wrap: str, checkpointed: bool) -> nn.Module:
    from bench.configs import CheckpointedBlock

    model = copy.deepcopy(base)
    if checkpointed:
        for index, block in enumerate(model.blocks):
            model.blocks[index] = CheckpointedBlock(block, None)
    if wrap == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class _Config:
    """One configuration on this rank: its model and the callable a step calls."""

    def __init__(self, name: str, model: nn.Module, step_fn: Callable):
        self.name, self.model, self.step_fn = name, model, step_fn
        self.parameters = list(model.parameters())
        self.times: list[float] = []

    def step(self, inputs: tuple[torch.Tensor, ...]) -> tuple[float, list[torch.Tensor]]:
        for parameter in self.parameters:
            parameter.grad = None
        loss = self.step_fn(*inputs)
        loss.backward()
        return loss.item(), [_local(p.grad) for p in self.parameters if p.grad is not None]

    def held_before_step(self) -> int:
        import graphopt

        held = graphopt.rank_memory(self.model)
        return held.parameters + held.buffers + held.gradient_buckets


def _prepare(name: str, base: nn.Module, wrap: str, budget: int | None, compiler: str) -> _Config:
    import graphopt

    model = _wrapped(base, wrap, checkpointed=name == "checkpoint-full")
    if name.startswith("graphopt"):
        return _Config(name, model, graphopt.compile(model, memory_budget=budget, compiler=compiler))
    setting = contextlib.nullcontext
    if name == "torch-amb-0.5":
        setting = lambda: torch._functorch.config.patch(activation_memory_budget=0.5)  # noqa: E731
    return _Config(name, model, torch.compile(model, backend=_own_backend(compiler, setting)))


def _own_backend(compiler: str, setting: Callable[[], Any]) -> Callable:
    """Inductor (or aot_eager) under `setting`, held while it compiles (AOTAutograd
    partitions forward and backward then), as a backend callable of this configuration's own: Dynamo keeps compiled code per backend callable, and without
    it a second copy of the model would run the first one's compile (its guards hold:
    same code, same shapes; ``activation_memory_budget`` is not among them)."""
    inner = torch._dynamo.lookup_backend("inductor" if compiler == "inductor" else "aot_eager")

    def backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        with setting():
            return inner(graph_module, example_inputs)

    return backend


def _measure(config: _Config, inputs: tuple[torch.Tensor, ...], warmup: int) -> dict[str, Any]:
    import graphopt

    started = time.perf_counter()
    config.step(inputs)
    first_step_s = time.perf_counter() - started
    for _ in range(warmup - 1):
        config.step(inputs)
    held = config.held_before_step() + sum(t.numel() * t.element_size() for t in inputs)
    (loss, gradients), peak = graphopt.measure_peak(lambda: config.step(inputs), device="cpu", cpu_method="allocated")
    return {"peak": held + peak.peak_bytes, "loss": loss, "gradients": [g.clone() for g in gradients], "first_step_s": first_step_s}


def _largest(value: int) -> int:
    """The largest of the ranks' `value`."""
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _rank(rank: int, store: str, out: str, wrap: str, args: dict[str, Any]) -> None:
    import graphopt
    from examples.gpt import build

    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # several compiled copies of one model's code
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(0)
    base, _ = build(batch=args["batch"], seq=args["seq"])
    generator = torch.Generator().manual_seed(rank)
    vocab = base.lm_head.out_features
    inputs = tuple(torch.randint(0, vocab, (args["batch"], args["seq"]), generator=generator) for _ in range(2))

    configs, measured, budgets = [], {}, {}
    for name in (*TORCH_CONFIGS, *(f"graphopt-at-{at}" for at in AT_CONFIGS)):
        at = name.removeprefix("graphopt-at-") if name.startswith("graphopt-at-") else None
        budgets[name] = _largest(measured[at]["peak"]) if at is not None else None
        torch.manual_seed(0)
        config = _prepare(name, base, wrap, budgets[name], args["compiler"])
        try:
            measured[name] = _measure(config, inputs, args["warmup"])
        except graphopt.GraphoptError as error:  # both ranks plan the same graphs, so both raise
            measured[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
            if rank == 0:
                print(f"[{wrap}] {name}: {measured[name]['error']}", flush=True)
            continue
        if name.startswith("graphopt"):
            measured[name]["predicted"] = max(plan.predicted_peak_bytes for plan in graphopt.plans(config.step_fn))
        configs.append(config)
        if rank == 0:
            print(f"[{wrap}] {name}: peak {measured[name]['peak'] / MEGABYTE:.1f} MB"
                  + (f" (budget {budgets[name] / MEGABYTE:.1f} MB)" if budgets[name] else "")
                  + f", first step {measured[name]['first_step_s']:.1f} s", flush=True)

    for round_ in range(args["steps"]):
        for config in configs if round_ % 2 == 0 else reversed(configs):
            started = time.perf_counter()
            config.step(inputs)
            config.times.append(time.perf_counter() - started)

    reference = measured["compile"]
    results = {name: {"budget": budgets[name], **found} for name, found in measured.items()}  # in the order run
    for config in configs:
        found = measured[config.name]
        results[config.name] = {
            "budget": budgets[config.name],
            "peak": found["peak"],
            "predicted": found.get("predicted"),
            "median_s": statistics.median(config.times),
            "first_step_s": found["first_step_s"],
            "loss_vs_compile": abs(found["loss"] - reference["loss"]),
            "gradient_vs_compile": max((g - r).abs().max().item() for g, r in zip(found["gradients"], reference["gradients"])),
        }
    Path(out, f"{wrap}-rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- parent


def _run_wrap(wrap: str, args: dict[str, Any]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix=f"graphopt-bench-{wrap}-") as scratch:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(scratch, "inductor"))  # cold, this wrap's own
        mp.spawn(_rank, args=(str(Path(scratch, "store")), scratch, wrap, args), nprocs=WORLD_SIZE, join=True)
        return [json.loads(Path(scratch, f"{wrap}-rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def rows_of(wrap: str, ranks: list[dict]) -> list[dict[str, Any]]:
    rows = []
    for name, first in ranks[0].items():
        at = name.removeprefix("graphopt-at-") if name.startswith("graphopt-at-") else None
        if "error" in first:
            rows.append({"wrap": wrap, "config": name, "budget_mb": first["budget"] / MEGABYTE, "vs": at, "error": first["error"]})
            continue
        rows.append({
            "wrap": wrap,
            "config": name,
            "budget_mb": first["budget"] / MEGABYTE if first["budget"] else "",
            "rank0_mb": ranks[0][name]["peak"] / MEGABYTE,
            "rank1_mb": ranks[1][name]["peak"] / MEGABYTE,
            "predicted_mb": first["predicted"] / MEGABYTE if first["predicted"] else "",
            "median_ms": first["median_s"] * 1000,
            "x_time": first["median_s"] / ranks[0][at]["median_s"] if at else "",
            "vs": at or "",
            "loss_vs_compile": max(rank[name]["loss_vs_compile"] for rank in ranks),
            "gradient_vs_compile": max(rank[name]["gradient_vs_compile"] for rank in ranks),
            "first_step_s": first["first_step_s"],
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| wrap | configuration | budget | rank 0 peak | rank 1 peak | predicted | median step | x time of the torch point |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['wrap']} | {row['config']} | {row['budget_mb']:.1f} MB | {row['error']} | | | | |")
            continue
        budget = f"{row['budget_mb']:.1f} MB" if row["budget_mb"] != "" else ""
        predicted = f"{row['predicted_mb']:.1f} MB" if row["predicted_mb"] != "" else ""
        ratio = f"{row['x_time']:.2f}x {row['vs']}" if row["x_time"] != "" else ""
        lines.append(
            f"| {row['wrap']} | {row['config']} | {budget} | {row['rank0_mb']:.1f} MB | {row['rank1_mb']:.1f} MB | "
            f"{predicted} | {row['median_ms']:.0f} ms | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wraps", default=",".join(WRAPS), help="comma-separated, of: " + ", ".join(WRAPS))
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every configuration each)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the measured one (the first compiles)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "eager"),
                        help="eager: no code generation (torch's aot_eager; graphopt's compiler='eager'), for smoke runs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/distributed.csv"))
    args = parser.parse_args(argv)
    wraps = [wrap for wrap in args.wraps.split(",") if wrap]
    unknown = set(wraps) - set(WRAPS)
    if unknown:
        parser.error(f"unknown wraps {sorted(unknown)}; choose from {', '.join(WRAPS)}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if not dist.is_available() or not dist.is_gloo_available():
        print("bench.distributed needs torch.distributed with gloo", file=sys.stderr)
        return 2

    settings = {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "seq": args.seq, "compiler": args.compiler}
    started = time.perf_counter()
    rows = [row for wrap in wraps for row in rows_of(wrap, _run_wrap(wrap, settings))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(format_table(rows))
    over = [row for row in rows if row["budget_mb"] != "" and not row.get("error") and max(row["rank0_mb"], row["rank1_mb"]) > row["budget_mb"]]
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s; "
          f"{len(over)} graphopt configuration(s) measured over the budget on a rank")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
