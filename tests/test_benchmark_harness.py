"""The benchmark harness itself stays runnable: a tiny run compares equal work on both sides.

Timings are printed by the benchmark, never asserted here; only numbers that do not depend on the
machine's speed are.
"""

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("peft")
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"


def test_quick_benchmark_runs_equal_work_and_reports_every_row(tmp_path):
    out = tmp_path / "core.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)], check=True, capture_output=True
    )
    report = json.loads(out.read_text())
    assert report["libraries"] == {"a": "lorakit", "b": "peft"}
    assert report["sanity"]["loss_max_abs_diff"] <= 1e-4  # both sides computed the same model
    saved = report["saved_for_backward"]
    assert saved["floor_mib"] < saved["a_mib"] <= saved["b_mib"]  # never more activations than PEFT
    for row in ("train_step", "eval_forward", "merge"):
        assert report[row], row
