"""python -m jobs.bench: where training time goes, as ratios measured side by side in one run."""

from __future__ import annotations

import json
import sys

from resnet.config import MODELS
from resnet.errors import OneLineParser, UsageError, run_main


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m jobs.bench",
        description="Benchmark the training path and print its tables: 1. the project's "
                    "training step and whole epoch against a bare PyTorch loop, timed alike "
                    "(1b: what each extra costs per step); 2. on-device augmentation against "
                    "torchvision's DataLoader; 3. start-up of jobs.train, cold and warm cache, "
                    "against a no-op TorchTrainer; 4. channels_last, bf16 and torch.compile "
                    "(compile seconds, cold and warm cache); 5. two 1-CPU workers against one "
                    "2-CPU worker; 6. jobs.predict's Ray Data pipeline (1 and 2 replicas) "
                    "against a plain PyTorch loop on the same 10,000 image files. Each ratio is "
                    "of two sides measured in this run; the tables also go to a JSON file. "
                    "--gpu-check runs the GPU figures instead.")
    p.add_argument("--data", help="data source, as for jobs.train (default: $CIFAR10_DATA, else "
                   "torchvision's download)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (resnet20, batch 32, 2 "
                   "steps): every table, to check that the benchmark (or --gpu-check) works")
    p.add_argument("--gpu-check", action="store_true", help="the GPU figures instead of the "
                   "tables: seconds per epoch (compile off/on), wall seconds to 88%% val_acc, "
                   "k trials packed on one GPU, start-up; stops by itself within --budget")
    p.add_argument("--budget", type=float, help="--gpu-check: seconds the whole check may take "
                   "(default 480)")
    p.add_argument("--models", help="comma-separated models for tables 1 and 4 (default "
                   "resnet20,resnet18)")
    p.add_argument("--batch-size", type=int, help="batch of every throughput figure (default 256)")
    p.add_argument("--steps", type=int, help="steps per timed block and per bench epoch "
                   "(default 20; resnet18 on a CPU: a fifth)")
    p.add_argument("--rounds", type=int, help="interleaved timed rounds per side, medians "
                   "(default 3)")
    p.add_argument("--out", default="results/bench.json", help="JSON file for the tables "
                   "(default results/bench.json; written atomically)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from dataclasses import replace

        from resnet.bench.tables import BenchConfig, print_table, run_bench
        from resnet.infra import storage
        from resnet.infra.provenance import provenance
        if args.budget is not None and not (args.gpu_check and args.budget > 0):
            raise UsageError("--budget needs --gpu-check and a positive number of seconds")
        if args.gpu_check:
            from resnet.bench.gpucheck import GpuCheck, run_check
            check = GpuCheck(data=args.data, smoke=args.smoke,
                             **({"budget_s": args.budget} if args.budget else {}))
            results = run_check(check, on_table=print_table)
            out = {"gpu_check": vars(check), **results, "provenance": provenance()}
            storage.write_bytes(storage.absolute(args.out), json.dumps(out, indent=2).encode())
            print(f"\nwrote {args.out}")
            return 0
        bench = BenchConfig.smoke_sized(args.data) if args.smoke else BenchConfig(data=args.data)
        if args.models:
            models = tuple(m.strip() for m in args.models.split(","))
            unknown = [m for m in models if m not in MODELS]
            if unknown:
                raise UsageError(f"--models: unknown {', '.join(unknown)}; known: {', '.join(MODELS)}")
            bench = replace(bench, models=models)
        for flag, value in (("batch_size", args.batch_size), ("steps", args.steps),
                            ("rounds", args.rounds)):
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
