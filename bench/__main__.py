"""graphopt against PyTorch's own memory tools, side by side: ``python -m bench --suite cpu``.

    python -m bench --suite cpu                    # the CPU suite (sized for 20 minutes on an idle 2-core machine)
    python -m bench --suite cpu --jobs 3 --resume  # 3 children at once; keep what an earlier run measured
    python -m bench --suite cpu --quick            # smoke run: tiny models, a few configurations
    python -m bench --suite gpu                    # the GPU suite (needs CUDA; skips cleanly without)
    python -m bench --models gpt,vit --configs compile,graphopt-0.5 --steps 10 --out /tmp/bench

Each configuration runs in its own process. Writes ``results.csv``, ``results.jsonl``
(everything the children reported, graphopt's memory timelines included), ``summary.md``
and ``pareto_<model>.png`` / ``timeline_<model>.png`` under ``--out`` (default
``bench/results/<suite>``). Configurations are listed in ``bench/configs.py``; see
docs/benchmarks.md for how to read the results.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.child import REPO_ROOT
from bench.configs import CONFIGURATIONS, CPU_DEFAULT, QUICK_DEFAULT, supported_variants
from bench.models import MODELS
from bench.suite import SuiteSettings, run_suite

DEFAULT_MODELS = {"cpu": ("gpt", "llama", "vit"), "gpu": ("llama",)}
QUICK_MODELS = tuple(MODELS)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--models", help=f"comma-separated, from {sorted(MODELS)} (default: the suite's)")
    parser.add_argument("--configs", help="comma-separated names from bench/configs.py, or 'all' (default: the suite's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration; the median counts (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before measuring, the compiling one included")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<suite>, quick: bench/results/<suite>/quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, few configurations and steps")
    parser.add_argument("--backend", choices=("inductor", "eager"), default="inductor",
                        help="eager: aot_eager and graphopt compiler='eager' (no code generation; tests only)")  # fmt: skip
    parser.add_argument("--child-timeout-s", type=float, default=3600.0, help="limit for one configuration")
    parser.add_argument("--jobs", type=int, default=1,
                        help="configurations measured at once (default 1; more only on a machine shared anyway)")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="keep the successful results already in --out/results.jsonl and run only the rest")  # fmt: skip
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> SuiteSettings:
    models = tuple(args.models.split(",")) if args.models else (QUICK_MODELS if args.quick else DEFAULT_MODELS[args.suite])
    unknown_models = [m for m in models if m not in MODELS]
    if unknown_models:
        raise SystemExit(f"unknown model(s) {unknown_models}; choose from {sorted(MODELS)}")
    return SuiteSettings(
        suite=args.suite,
        size="quick" if args.quick else "full",
        models=models,
        configs=_resolve_configs(args),
        steps=args.steps,
        warmup=args.warmup,
        out=args.out or REPO_ROOT / "bench" / "results" / args.suite / ("quick" if args.quick else ""),
        backend=args.backend,
        child_timeout_s=args.child_timeout_s,
        jobs=args.jobs,
        resume=args.resume,
    )


def _resolve_configs(args: argparse.Namespace) -> tuple[str, ...]:
    """The configurations to run: those asked for, less GPU-only ones on CPU and graphopt options not yet there."""
    if args.configs == "all":
        asked = tuple(CONFIGURATIONS)
    elif args.configs:
        asked = tuple(args.configs.split(","))
    else:
        asked = QUICK_DEFAULT if args.quick else (CPU_DEFAULT if args.suite == "cpu" else tuple(CONFIGURATIONS))
    unknown = [c for c in asked if c not in CONFIGURATIONS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGURATIONS)}")
    runnable = supported_variants()
    chosen = []
    for config in asked:
        if CONFIGURATIONS[config].gpu_only and args.suite != "gpu":
            print(f"{config}: GPU only, not run in the {args.suite} suite", file=sys.stderr)
        elif config not in runnable:
            print(f"{config}: this graphopt does not accept its options yet; not run", file=sys.stderr)
        else:
            chosen.append(config)
    return tuple(chosen)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.suite == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: the GPU suite is skipped (nothing written)")
            return 0
    settings = resolve_settings(args)
    rows = run_suite(settings)
    print((settings.out / "summary.md").read_text())
    print(f"wrote {settings.out}/results.csv, summary.md and plots")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
