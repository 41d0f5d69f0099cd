"""python -m jobs.bench: where training time goes, as ratios measured side by side in one run."""

from __future__ import annotations

import json
import sys

from resnet.config import MODELS
from resnet.errors import OneLineParser, UsageError, run_main


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m jobs.bench",
        description="Benchmark the training path and print five tables: 1. step throughput of "
                    "the project's Ray Train path against a bare PyTorch loop; 2. on-device "
                    "augmentation against torchvision's DataLoader; 3. start-up of jobs.train, "
                    "cold and warm cache; 4. channels_last, bf16 and torch.compile; 5. two 1-CPU "
                    "workers against one 2-CPU worker. Each figure is a ratio measured in this "
                    "run; the tables also go to a JSON file.")
    p.add_argument("--data", help="data source, as for jobs.train (default: $CIFAR10_DATA, else "
                   "torchvision's download)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (resnet20, batch 32, 3 steps): "
                   "every table in about a minute, to check that the benchmark works")
    p.add_argument("--models", help="comma-separated models for tables 1 and 4 (default "
                   "resnet20,resnet18)")
    p.add_argument("--batch-size", type=int, help="batch of every throughput figure (default 256)")
    p.add_argument("--steps", type=int, help="timed steps per throughput figure (default 20)")
    p.add_argument("--out", default="results/bench.json", help="JSON file for the tables "
                   "(default results/bench.json; written atomically)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from dataclasses import replace

        from resnet import storage
        from resnet.bench import BenchConfig, print_table, run_bench
        from resnet.provenance import provenance
        bench = BenchConfig.smoke_sized(args.data) if args.smoke else BenchConfig(data=args.data)
        if args.models:
            models = tuple(m.strip() for m in args.models.split(","))
            unknown = [m for m in models if m not in MODELS]
            if unknown:
                raise UsageError(f"--models: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
            bench = replace(bench, models=models)
        for flag, value in (("batch_size", args.batch_size), ("steps", args.steps)):
            if value is not None:
                if value < 1:
                    raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
                bench = replace(bench, **{flag: value})
        results = run_bench(bench, on_table=print_table)  # each table as soon as it is done
        print(f"\njobs.bench on {results['device']}")
        out = {"bench": vars(bench) | {"models": list(bench.models)}, **results,
               "provenance": provenance()}
        storage.write_bytes(storage.absolute(args.out), json.dumps(out, indent=2).encode())
        print(f"wrote {args.out}")
        return 0

    return run_main("jobs.bench", run)


if __name__ == "__main__":
    sys.exit(main())
