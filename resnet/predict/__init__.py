"""``jobs.predict``: an exported model on your own images (a folder, an archive, a list file or a
bucket) as a Ray Data pipeline, with its outputs and a Grad-CAM gallery (docs/predict.md)."""
