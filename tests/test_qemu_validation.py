"""qsim against live QEMU: every test vector of shared/qemu-behaviour.md and the bundled real fio traces, replayed
through qemu-io with qcow2 cache tracing, once per QEMU build (the ``qemu`` fixture: QSIM_QEMU_PREFIXES, in CI 7.2
and 10.0). Runs for real in CI (QSIM_REQUIRE_QEMU=1); skips elsewhere without QEMU."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsim.imageopts import ImageOptions
from qsim.scenario import Scenario
from qsim.trace import READ, WRITE, Trace
from qsim.traceio import read_trace
from qsim.validate import COMPARED, validate

pytestmark = pytest.mark.qemu
K, M, G = 1 << 10, 1 << 20, 1 << 30
TRACES = Path(__file__).resolve().parent.parent / "traces"
PRE = ImageOptions(preallocation="metadata")


def reads(offsets, length=4096):
    return Trace.from_arrays([READ] * len(offsets), offsets, [length] * len(offsets))


def writes(offsets, lengths):
    return Trace.from_arrays([WRITE] * len(offsets), offsets, lengths)


VECTORS = {
    "3 tables, 2 x 64k entries": (reads([0, 512 * M, G] * 10), 2 * G, PRE, 128 * K, 64 * K, "writeback"),
    "3 tables, 4 x 64k entries": (reads([0, 512 * M, G] * 10), 2 * G, PRE, 256 * K, 64 * K, "writeback"),
    "3 tables, default cache": (reads([0, 512 * M, G] * 10), 2 * G, PRE, None, None, "writeback"),
    "8k cache -> 4k slices": (reads([0, 32 * M, 64 * M] * 10), G, PRE, 8 * K, None, "writeback"),
    "12k cache": (reads([0, 32 * M, 64 * M] * 10), G, PRE, 12 * K, None, "writeback"),
    "whole-disk cache": (reads([0, 32 * M, 64 * M] * 10), G, PRE, 128 * K, None, "writeback"),
    "l2-cache-size=512": (reads([0, 512 * M, G] * 10), 2 * G, PRE, 512, None, "writeback"),
    "l2-cache-size=0": (reads([0, 512 * M, G] * 10), 2 * G, PRE, 0, None, "writeback"),
    "capped at 256k": (reads([0, 512 * M, G] * 10), 2 * G, PRE, M, None, "writeback"),
    "fresh image reads": (reads([0, 512 * M, G] * 10), 2 * G, ImageOptions(), None, None, "writeback"),
    "extended_l2 tables": (reads([0, 256 * M, 512 * M] * 10), 2 * G,
                           ImageOptions(preallocation="metadata", extended_l2=True), 128 * K, 64 * K, "writeback"),
    "128k read over a slice end": (reads([2 * M - 64 * K], 128 * K), 2 * G, PRE, 8 * K, None, "writeback"),
    "128k read over a table end": (reads([512 * M - 64 * K], 128 * K), 2 * G, PRE, 8 * K, None, "writeback"),
    "8k read over a cluster end": (reads([60 * K], 8 * K), 2 * G, PRE, None, None, "writeback"),
    "first 64k write": (writes([0], [64 * K]), 2 * G, ImageOptions(), None, None, "writeback"),
    "first 64k write, 4k slices": (writes([0], [64 * K]), 2 * G, ImageOptions(), 8 * K, None, "writeback"),
    "alloc / overwrite / alloc 4k / alloc 64k": (writes([M, M + 8 * K, 3 * M, 5 * M], [64 * K, 4 * K, 4 * K, 64 * K]),
                                                 2 * G, ImageOptions(), None, None, "writeback"),
    "the same, extended_l2": (writes([M, M + 8 * K, 3 * M, 5 * M], [64 * K, 4 * K, 4 * K, 64 * K]), 2 * G,
                              ImageOptions(extended_l2=True), None, None, "writeback"),
    "3 writes, writeback": (writes([0, 64 * K, 128 * K], [4 * K] * 3), 2 * G, ImageOptions(), None, None, "writeback"),
    "3 writes, writethrough": (writes([0, 64 * K, 128 * K], [4 * K] * 3), 2 * G, ImageOptions(), None, None,
                               "writethrough"),
    "extended_l2 512B mid-subcluster twice": (writes([64 * K + 512] * 2, [512] * 2), G,
                                              ImageOptions(preallocation="metadata", extended_l2=True), None, None,
                                              "writeback"),
    "1T, 8193 slices twice": (reads(np.tile(np.arange(8193) * 32 * M, 2)), 1 << 40, PRE, None, None, "writeback"),
}


@pytest.mark.parametrize("name", list(VECTORS))
def test_vector_matches_qemu(name, qemu):
    trace, size, options, l2, entry, mode = VECTORS[name]
    v = validate(trace, Scenario.of((l2,), entry, options, size, cache_mode=mode), qemu_io=qemu)
    assert {k: v.qsim[k] for k in COMPARED} == {k: v.qemu[k] for k in COMPARED}
    assert v.match


FIO_CASES = [
    ("fio-randread-4k", PRE, 64 * K, None, "writeback"),
    ("fio-randread-4k", ImageOptions(cluster_size=2 * M, preallocation="metadata", extended_l2=True), None, None,
     "writeback"),
    ("fio-randrw-mixed-fsync", ImageOptions(), 32 * K, None, "writethrough"),
    ("fio-randrw-mixed-fsync", ImageOptions(extended_l2=True, preallocation="metadata"), 256 * K, 64 * K,
     "writeback"),
    ("fio-randrw-mixed-fsync", ImageOptions(backing=True), None, None, "writeback"),
    ("fio-seqwrite-64k", ImageOptions(cluster_size=128 * K, extended_l2=True, preallocation="metadata"), None, None,
     "writeback"),
    ("fio-seqwrite-64k", ImageOptions(cluster_size=16 * K), 64 * K, None, "writethrough"),
    ("fio-randwrite-4k", ImageOptions(), 64 * K, None, "writeback"),
    ("fio-randwrite-4k", ImageOptions(cluster_size=128 * K, extended_l2=True, backing=True), 256 * K, None,
     "writeback"),
]


@pytest.mark.parametrize("name, options, l2, entry, mode", FIO_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(FIO_CASES)])
def test_real_fio_trace_matches_qemu(name, options, l2, entry, mode, qemu):
    trace = read_trace(str(TRACES / f"{name}.iolog.gz"))
    size = max(-(-trace.max_end_offset // G), 1) * G
    v = validate(trace, Scenario.of((l2,), entry, options, size, cache_mode=mode), qemu_io=qemu)
    assert {k: v.qsim[k] for k in COMPARED} == {k: v.qemu[k] for k in COMPARED}
    assert v.match


def test_cli_validate(qemu):
    proc = subprocess.run([sys.executable, "-m", "qsim", "validate", str(TRACES / "synth-hotspot-mixed.csv"),
                           "-o", "preallocation=metadata", "--l2-cache-size", "64k", "--output=json",
                           "--qemu-io", qemu], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["match"] is True and d["differences"] == {}
    assert d["qsim"]["l2_misses"] == d["qemu"]["l2_misses"] > 1000
