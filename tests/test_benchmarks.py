"""Every benchmark under bench/ runs to the end, in a tiny configuration.

Why: the benchmarks are how this project measures itself, and nothing else
runs them; a change to a face or to a bench's own plumbing could break one
silently until the next time someone needs its figures. These runs check that
each one completes and prints the ratios it exists to print, not the figures
themselves (those are never asserted: the machines are shared and noisy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# module, tiny arguments, lines (or line beginnings) its output must contain
BENCHES: list[tuple[str, list[str], list[str]]] = [
    (
        "bench.kv",
        ["--threads", "2", "--seconds", "0.3", "--rounds", "1", "--http", "--put-rate", "50"],
        [
            "rescat/pymongo put ops/s",
            "rescat/pymongo paced p50 latency",
            "http/pymongo cas ops/s",
            "http/pymongo watch p50 after the write returned",
        ],
    ),
    ("bench.small", ["--threads", "2", "--seconds", "0.5"], ["put_vs_raw_insert:"]),
    ("bench.core", ["--mib", "4", "--rss-mib", "8", "--rounds", "1"], ["peak RSS, put"]),
    (
        "bench.driver",
        ["--mib", "4", "--move-mib", "8", "--rounds", "1", "--children", "50", "--walk", "200"],
        ["walk 200 paths"],
    ),
    ("bench.snapshots", ["--ops", "20", "--rounds", "1"], ["WriteTransaction"]),
    (
        "bench.scale",
        ["--clients", "2", "--seconds", "0.5", "--big-mib", "2"],
        ["PUT 4 KiB", "GET 4 KiB", "service CPU per PUT"],
    ),
    (
        "bench.http",
        ["--size-mib", "4", "--dedup-mib", "8", "--seconds", "0.5"],
        [
            "4 KiB PUT/s HTTP / raw inserts",
            "4 KiB GET/s HTTP / raw find_one",
            "ceiling asyncput: PUT/s / raw inserts",
        ],
    ),
]


@pytest.mark.parametrize(("module", "args", "expected"), BENCHES, ids=[b[0] for b in BENCHES])
def test_benchmark_runs_to_its_ratios(
    mongo_uri: str, module: str, args: list[str], expected: list[str]
) -> None:
    env = {**os.environ, "RESCAT_BENCH_MONGO_URI": mongo_uri, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for wanted in expected:
        assert wanted in run.stdout, f"{module} printed no {wanted!r}:\n{run.stdout[-3000:]}"
    last = run.stdout.strip().splitlines()[-1]
    if last.startswith("{"):  # the benches that end with their figures as JSON
        figures = json.loads(last)
        assert figures, f"{module} printed empty figures"
    if module == "bench.kv":
        ratios = json.loads(last)["ratios"]
        for key in ("rescat_pymongo_paced", "http_pymongo_paced", "http_pymongo_put"):
            assert ratios[key] > 0, (key, ratios)
