"""Images with an external data file (``-o data_file=``, issue #19): QEMU keeps guest data at the guest offset in
the data file, so data-file offset 0 is data (an L2 entry with offset 0 and QCOW_OFLAG_COPIED is a normal
cluster: qcow2_get_cluster_type), a new data cluster allocates nothing in the image file
(do_alloc_cluster_offset) and no refcount changes for it (qcow2_free_any_cluster); L2 tables still come from the
image file's allocator. Replay and validate work on such images and match qemu-io counter for counter."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qsim.image import image_from_qcow2
from qsim.qcow2 import open_image
from qsim.scenario import ImageSpec, Scenario
from qsim.synth import synthesize
from qsim.trace import READ, WRITE, Trace, concat
from qsim.validate import validate

pytestmark = pytest.mark.qemu
K, M, G = 1 << 10, 1 << 20, 1 << 30
TRACES = Path(__file__).resolve().parent.parent / "traces"


def _make(folder: Path, qemu_bin: str, options: str, size: str = "4G") -> tuple[Path, Path]:
    """A data-file image with data at guest cluster 0 and 100M, a plain zero cluster at 200M (write -z on nothing)
    and an allocated one at 300M (write -z keeps what is there)."""
    folder.mkdir(parents=True, exist_ok=True)
    path, data = folder / "img.qcow2", folder / "data.raw"
    subprocess.run([os.path.join(qemu_bin, "qemu-img"), "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={data}" + (f",{options}" if options else ""), str(path), size], check=True)
    step = 100 * M * _bytes(size) // (4 * G) // (64 * K) * (64 * K)  # 100M on a 4G disk
    commands = ["write -q -P 7 0 64k", f"write -q -P 7 {step} 4k", f"write -q -z {2 * step} 64k",
                f"write -q -P 7 {3 * step} 64k", f"write -q -z {3 * step} 64k"]
    subprocess.run([os.path.join(qemu_bin, "qemu-io"), *sum((["-c", c] for c in commands), []), str(path)],
                   check=True, capture_output=True)
    return path, data


def _bytes(size: str) -> int:
    return int(size[:-1]) << {"M": 20, "G": 30}[size[-1]]


def _trace(size: int, n: int, seed: int) -> Trace:
    """Reads and writes of 4k..256k, uniform, after a read and an overwrite of guest cluster 0 (data-file offset 0)."""
    head = Trace.from_arrays([READ, WRITE, READ, WRITE], [0, 0, size // 40, 8 * K], [4 * K] * 4)
    return concat([head, synthesize(size, n, "uniform", "4k/50:64k/30:256k/20", read_share=0.5, seed=seed)])


def test_offset_zero_with_copied_is_data(tmp_path, qemu_img, qemu_io):
    """Guest cluster 0 at data-file offset 0 is allocated (it used to read as unallocated); the zero clusters are
    plain (0x1) and allocated (offset | ZERO | COPIED); nothing bounds data offsets by the image file, which holds
    no data."""
    path, _ = _make(tmp_path, os.path.dirname(qemu_io), "")
    state = image_from_qcow2(open_image(str(path)))
    host, flags, _ = state.table_entries(int(state.table_slot[0]))
    assert state.has_data_file and host[0] == 1 and flags[0] == 4  # data_file_host(0), COPIED
    assert host[1600] == 1601 and (host[3200], flags[3200]) == (0, 1) and (host[4800], flags[4800]) == (4801, 5)
    assert state.clusters_allocated == 3 and state.file_bytes == 5 * 64 * K  # header, reftable, refblock, L1, L2


def test_replay_cli_accepts_a_data_file_image(tmp_path, qemu_img, qemu_io):
    path, _ = _make(tmp_path, os.path.dirname(qemu_io), "")
    proc = subprocess.run([sys.executable, "-m", "qsim", "replay", str(TRACES / "fio-randwrite-4k.iolog.gz"),
                           "--image", str(path), "--offset-policy", "wrap", "--output", "json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "past the end" not in proc.stderr and "Traceback" not in proc.stderr


CASES = {  # name: (qemu-img -o options, virtual size, requests, l2-cache-size)
    "64k": ("", 4 * G, 3000, None),
    "64k, 64k cache": ("", 4 * G, 3000, 64 * K),
    "extended_l2 128k": ("extended_l2=on,cluster_size=128k", 4 * G, 3000, 64 * K),
    # 4k clusters: a refcount block covers 8 MiB of the image file, so data allocated there (as without a data file)
    # would add refcount blocks, L2 cache flushes and file size that QEMU does not have
    "4k clusters, 64 MiB written": ("cluster_size=4k", 64 * M, 2500, 32 * K),
}


def test_validate_matches_qemu_io(tmp_path, qemu):
    """qemu-io on a copy of the image and its data file, and qsim: every compared counter equal, for reads and
    allocating writes, extended_l2 off and on; the user's image and data file are left byte-identical."""
    prefix = os.path.dirname(qemu)

    def one(name):
        options, size, n, cache = CASES[name]
        path, data = _make(tmp_path / name.replace(" ", "_").replace(",", ""), prefix, options,
                           f"{size // M}M")
        before = (path.read_bytes(), data.read_bytes(), data.stat().st_mtime_ns)
        trace = _trace(size, n, seed=len(name))
        if "4k clusters" in name:  # sequential 64k writes over the whole disk
            offsets = np.arange(0, size, 64 * K)
            trace = concat([trace, Trace.from_arrays([WRITE] * len(offsets), offsets, [64 * K] * len(offsets))])
        v = validate(trace, replace(Scenario.of((cache,)), image=ImageSpec(path=str(path))), qemu_io=qemu)
        after = (path.read_bytes(), data.read_bytes(), data.stat().st_mtime_ns)
        return name, v, before == after

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, CASES))
    for name, v, untouched in results:
        assert v.match, (name, v.differences)
        assert untouched, name
        assert v.qsim["l2_writebacks"] > 0 and v.qsim["l2_lookups"] > 2000, name
    small = {name: v for name, v, _ in results}["4k clusters, 64 MiB written"]
    # 64 MiB of data went to the data file: the image file holds its metadata and the 32 L2 tables only
    assert small.qsim["image_file_bytes"] < 64 * 4 * K
