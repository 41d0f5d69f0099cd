"""jobs.bench --smoke: every table is produced with real measurements (no speed is asserted)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_job

pytestmark = pytest.mark.e2e


def test_bench_smoke_prints_and_saves_all_five_tables(shared_archive, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_job("jobs.bench", "--smoke", "--data", str(shared_archive), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    tables = results["tables"]
    assert [title.split(".")[0] for title in tables] == ["1", "2", "3", "4", "5"]
    for title in tables:
        assert title in proc.stdout
    measured = [v for rows in tables.values() for row in rows for k, v in row.items()
                if k.endswith("_s") or k.endswith("_per_s") or k == "ratio"]
    numbers = [v for v in measured if not isinstance(v, str)]
    assert numbers and all(math.isfinite(v) and v > 0 for v in numbers)
    assert all(v == "not measured: no GPU" for v in measured if isinstance(v, str))
    startup = {row["run"]: row for row in tables["3. start-up of jobs.train (seconds)"]}
    assert startup["cold cache"]["data_load_s"] > startup["warm cache"]["data_load_s"]
    assert results["provenance"]["versions"]["torch"]
