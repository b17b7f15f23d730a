"""The benchmark harness runs (tiny sizes), so it cannot rot. Timing is never asserted here."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "bench.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--csv", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == 5
    assert all(row["misses_at_1M"] >= 0 and row["qsim_20_sizes_req_s"] > 0 for row in data["rows"])
    assert "iolog_lines_s" in data
