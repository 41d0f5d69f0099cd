"""python -m jobs.predict MODEL SOURCE --out DIR: classify a folder, archive, list or bucket of
images with an exported model, as a Ray Data pipeline (embedded local Ray, or RAY_ADDRESS)."""

from __future__ import annotations

import sys

from resnet.errors import OneLineParser, run_main
from resnet.infra.console import hidden_note, quiet


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m jobs.predict",
        description="Predict the class of every image in SOURCE with an exported model, on Ray "
                    "Data (files read and decoded in a stream, the model in a pool of replicas, "
                    "one per GPU when the cluster has GPUs). Each image is brought to what the "
                    "export takes, float32 N x 3 x 32 x 32 in [0, 1], the usual way for a "
                    "32 x 32 classifier: EXIF orientation applied, converted to RGB (16-bit "
                    "channels to 8 bits, alpha dropped), the shorter side resized to 32 "
                    "(bilinear, antialiased), then the centre 32 x 32 cropped. Writes "
                    "DIR/predictions.parquet and DIR/summary.json (and, with --gradcam, "
                    "DIR/index.html and DIR/gradcam/), replacing an earlier run's.",
        epilog="Files that are not images, or are corrupt, are skipped and listed with their "
               "reason in summary.json; the run goes on. Details: docs/predict.md.")
    p.add_argument("model", metavar="MODEL", help="an exported model.pt2 (jobs.train, jobs.tune), "
                   "or the run or sweep folder holding best/model.pt2; local path or URI")
    p.add_argument("source", metavar="SOURCE", help="the images: a folder (searched "
                   "recursively), a .tar/.tar.gz/.tar.xz archive, a list file (one path or URI "
                   "per line) or a prefix such as s3://BUCKET/PATH (any pyarrow URI); hidden "
                   "files are left out")
    p.add_argument("--out", required=True, help="output folder or URI (created; the outputs "
                   "of an earlier run there are replaced)")
    p.add_argument("--top-k", type=int, default=3, help="classes (and probabilities) kept per "
                   "image, best first (default 3)")
    p.add_argument("--gradcam", type=int, default=0, metavar="N", help="Grad-CAM overlays of "
                   "the N least confident images in DIR/gradcam/ and a gallery, DIR/index.html "
                   "(default 0: none)")
    p.add_argument("--classes", help="class names, comma-separated in the order of the "
                   "model's outputs (default: from the export, else from summary.json of the run "
                   "it belongs to)")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call "
                   "(default 256)")
    p.add_argument("--replicas", type=int, help="copies of the model working in parallel "
                   "(default: one per GPU; on CPUs one per CPU, at most 8)")
    p.add_argument("--cpus-per-replica", type=int, help="CPUs, and torch threads, of each "
                   "replica on CPUs (default: the CPUs divided by --replicas)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="use_gpu", action="store_const", const=True,
                        help="infer on GPUs (default: when the cluster has any)")
    device.add_argument("--cpu", dest="use_gpu", action="store_const", const=False,
                        help="infer on CPUs even when GPUs exist")
    p.add_argument("--verbose", action="store_true", help="show all of Ray's own logging on "
                   "the console too (default: only its errors; all of it is in Ray's session "
                   "logs); also RESNET_VERBOSE=1")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    verbose = args.pop("verbose")
    filters = quiet(verbose) if argv is None else []  # before Ray is imported

    def run() -> int:
        from resnet.predict.run import (  # imports Ray and torch: after parsing
            PredictConfig,
            run_predict,
        )
        run_predict(PredictConfig(**args))
        return 0

    return run_main("jobs.predict", run, standalone=argv is None,
                    closing_note=lambda: hidden_note(filters))


if __name__ == "__main__":
    sys.exit(main())
