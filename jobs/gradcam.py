"""python -m jobs.gradcam: Grad-CAM of any checkpoint on held-out images (test split when the
source has one, else the validation split the checkpoint was trained without)."""

from __future__ import annotations

import sys

from resnet.config import CAM_METHODS
from resnet.errors import OneLineParser, run_main


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m jobs.gradcam",
                      description="Render Grad-CAM (the grad-cam package) for a checkpoint: "
                                  "DIR/gradcam.png (a labelled grid), one PNG per image and "
                                  "cams.npz (the CAMs as arrays).")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by jobs.train or "
                   "jobs.tune, or the epoch folder holding it")
    p.add_argument("--data", help="data source the model was trained on (default: $CIFAR10_DATA, "
                   "else torchvision's download)")
    p.add_argument("--images", type=int, default=10, help="images to explain, one per class "
                   "first (default 10)")
    p.add_argument("--out", required=True, help="output folder (created; files are replaced "
                   "atomically)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam",
                   help="CAM method of the grad-cam package (default gradcam)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from resnet.report.gradcam import (
            explain_checkpoint,  # imports torch: after parsing
        )
        written = explain_checkpoint(args.checkpoint, args.data, args.images, args.out, args.method)
        print(f"wrote {len(written)} files to {args.out}: {', '.join(written[:3])}, ...")
        return 0

    return run_main("jobs.gradcam", run)


if __name__ == "__main__":
    sys.exit(main())
