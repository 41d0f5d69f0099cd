"""What every layer above uses and nothing of ours below it: the Ray cluster a job runs on,
storage (local or any pyarrow filesystem), the quiet console, timing marks and provenance."""
