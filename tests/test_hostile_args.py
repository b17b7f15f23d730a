"""Absurd arguments to replay, sweep and validate (issue 19's reproducers): one line, a sensible exit status,
and never a hang: each command here must answer within seconds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

TRACE = str(Path(__file__).resolve().parent.parent / "traces" / "synth-hotspot-mixed.csv")


def qsim(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv, status, words", [
    (["replay", TRACE, "--l2-cache-size", "64k..64M:1000000000"], 2, "2 to 1000 points"),
    (["replay", TRACE, "--l2-cache-size", "512..64M:100000000"], 2, "2 to 1000 points"),
    (["sweep", TRACE, "--save", "{tmp}/out/", "--scheduler", "garbage"], 2, "Dask scheduler address"),
    (["sweep", TRACE, "--save", "{tmp}/out/", "--workers", "0"], 2, "at least one worker"),
    (["sweep", TRACE, "--save", "{tmp}/out/", "--scheduler", "tcp://127.0.0.1:1"], 1, "no Dask scheduler answered"),
])
def test_absurd_arguments_get_one_line_quickly(tmp_path, argv, status, words):
    pytest.importorskip("distributed") if "tcp://127.0.0.1:1" in argv else None
    started = time.monotonic()
    proc = qsim(*(a.format(tmp=tmp_path) for a in argv))
    assert time.monotonic() - started < 30
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr


def test_a_thousand_workers_start_no_more_processes_than_cores(tmp_path):
    from qsim.fleet import local_workers

    assert local_workers(1000, tasks=3) <= 3
    assert local_workers(1000, tasks=10_000) == (__import__("os").cpu_count() or 1)
    started = time.monotonic()
    proc = qsim("sweep", TRACE, "--save", f"{tmp_path}/out/", "--workers", "1000", "--cluster-size", "64k,2M")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 60


def test_validate_keeps_a_zero_size():
    """--size 0 is a 0-byte disk (QEMU makes one), not 'the default': every request lies beyond it."""
    from qsim.scenario import ImageSpec

    assert ImageSpec(virtual_size=0).virtual_size == 0
    proc = qsim("replay", TRACE, "--size", "0")
    assert proc.returncode == 1 and "beyond" in proc.stderr
