"""python -m jobs.analyze: what happened in a sweep (finished or still running), as a table,
plots, Parquet/CSV and one self-contained report.html."""

from __future__ import annotations

import sys

from resnet.errors import OneLineParser, UsageError, run_main


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m jobs.analyze",
        description="Read a sweep written by jobs.tune (a local folder or a URI pyarrow reads, "
                    "such as s3://bucket/sweeps/name) and print one row per trial, best first. "
                    "Writes curves.png, lr.png, confusion.png, trials.parquet, trials.csv and "
                    "report.html. A sweep that is still running gives partial results.")
    p.add_argument("experiment", metavar="EXPERIMENT",
                   help="the sweep's folder, <storage>/<name> of jobs.tune")
    p.add_argument("--out", help="output folder or URI (default: EXPERIMENT/analysis)")
    p.add_argument("--metric", default="val_acc", help="metric that ranks the trials; a *loss "
                   "is minimised, anything else maximised (default val_acc)")
    p.add_argument("--top", type=int, help="show only the best N trials (table and report)")
    p.add_argument("--mlflow", metavar="URI", help="also upload the sweep to this MLflow "
                   "tracking server or store (a parent run, a child run per trial with every "
                   "epoch, the winner's files and model); what is already there is not logged "
                   "again")
    p.add_argument("--mlflow-model-name", help="the registered model's name (default "
                   "resnet-cifar10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.top is not None and args.top < 1:
            raise UsageError(f"--top must be at least 1, got {args.top}")
        from resnet.infra import storage
        from resnet.report.analysis import open_experiment, print_analysis
        from resnet.report.html import write_analysis
        analysis = open_experiment(args.experiment, args.metric)
        out = args.out or storage.join(analysis.exp_dir, "analysis")
        written = write_analysis(analysis, storage.absolute(out), args.top)
        print_analysis(analysis, written, out, args.top)
        if args.mlflow:
            from resnet.tracking.sweep_runs import upload_sweep
            link = upload_sweep(args.mlflow, analysis, args.mlflow_model_name or "resnet-cifar10")
            print(f"MLflow: {link or args.mlflow}")
        return 0

    return run_main("jobs.analyze", run)


if __name__ == "__main__":
    sys.exit(main())
