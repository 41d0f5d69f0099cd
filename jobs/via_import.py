"""python -m jobs.via_import: VGG Image Annotator (VIA 2.x, 1.x) regions -> an image-folder tree."""

from __future__ import annotations

import sys

from resnet.errors import OneLineParser, run_main


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m jobs.via_import",
                      description="Crop the regions of a VIA export (2.x or 1.x; CSV, or "
                                  "project / annotation JSON) into TREE/train/<class>/ and "
                                  "TREE/test/<class>/ PNGs plus TREE/manifest.csv (a row per "
                                  "region: its crop, or why it was skipped); the class is a "
                                  "region attribute. Prints what was written and skipped.")
    p.add_argument("--csv", required=True, help="the VIA export: .csv (VIA 2.x or 1.x), or "
                   ".json (project or annotations)")
    p.add_argument("--images", required=True, help="folder holding the annotated images "
                   "(export filenames are relative to it, absolute, or matched by base name)")
    p.add_argument("--attribute", required=True, help="region attribute whose value is the "
                   "class (e.g. Gender); for a checkbox attribute, the single checked option")
    p.add_argument("--out", required=True, help="the tree to write (must not exist; written "
                   "to a temp folder and renamed)")
    p.add_argument("--size", type=int, default=32, help="side of the square crops in pixels "
                   "(default 32)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held "
                   "out in test/, stratified and deterministic (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from resnet.data.via import import_via, print_summary
        summary = import_via(args.csv, args.images, args.attribute, args.out, args.size,
                             args.val_fraction, args.seed)
        print_summary(summary, args.out)
        return 0

    return run_main("jobs.via_import", run)


if __name__ == "__main__":
    sys.exit(main())
