"""Backing chains as QEMU opens them: any depth, qcow2 and raw backing files, names relative to the image that
names them, each qcow2 layer's own L2 cache -- against qemu-io with no flag given, on every QEMU the environment
lists (the ``qemu_prefix`` fixture: QSIM_QEMU_PREFIXES, or qemu-io on PATH)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from qsim.cachecfg import CacheSettings
from qsim.errors import QsimError
from qsim.image import backing_chain
from qsim.qcow2 import open_image
from qsim.replay import replay
from qsim.scenario import ImageSpec, Scenario
from qsim.trace import READ, WRITE, Trace
from qsim.validate import validate

K, M, G = 1 << 10, 1 << 20, 1 << 30
def tool(prefix: str, name: str) -> str:
    return os.path.join(prefix, name)


def fill(prefix: str, path: str, size: int, count: int, seed: int, lengths=(4 * K, 64 * K, 8 * K), pattern=1,
         zeroes=0.0):
    """Random writes into the image; a share ``zeroes`` of them write zeroes (zero clusters or subclusters)."""
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, (size - 64 * K) // 4096, count) * 4096
    cmds = "".join(f"write -q {'-z' if rng.random() < zeroes else f'-P {pattern}'} {o} {rng.choice(lengths)}\n"
                   for o in offsets)
    subprocess.run([tool(prefix, "qemu-io"), path], input=cmds, text=True, check=True, capture_output=True)


def create(prefix: str, path: str, size: int | None = None, backing: str | None = None, fmt: str = "qcow2",
           cluster: str = "64k", extended_l2: bool = False):
    cmd = [tool(prefix, "qemu-img"), "create", "-q", "-f", "qcow2", "-o",
           f"cluster_size={cluster},extended_l2={'on' if extended_l2 else 'off'}"]
    if backing is not None:
        cmd += ["-b", backing, "-F", fmt]
    subprocess.run(cmd + [path] + ([str(size)] if size is not None else []), check=True)


def mixed(size: int, count: int, seed: int) -> Trace:
    """Reads and writes of 512 B to 64k, unaligned: COW head and tail regions, zero-checks down the chain."""
    rng = np.random.default_rng(seed)
    ops = rng.choice([READ, WRITE], count, p=[0.6, 0.4])
    offsets = rng.integers(0, (size - 64 * K) // 512, count) * 512
    lengths = rng.choice([512, 4 * K, 16 * K, 64 * K], count)
    return Trace.from_arrays(ops, offsets, lengths)


def same(v) -> dict:
    return {k: (v.qsim[k], v.qemu[k]) for k in v.compared if v.qsim[k] != v.qemu[k]}


@pytest.mark.qemu
def test_three_qcow2_layers_no_flags(tmp_path, qemu_prefix):
    qemu = qemu_prefix
    """qcow2 over qcow2 over qcow2, the top named on the command line only: the middle's holes go to the base."""
    base, mid, top = (str(tmp_path / n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    create(qemu, base, G)
    fill(qemu, base, G, 300, 1)
    create(qemu, mid, backing="base.qcow2")
    fill(qemu, mid, G, 300, 2, pattern=2)
    create(qemu, top, backing="mid.qcow2")
    trace = mixed(G, 2500, 3)
    v = validate(trace, Scenario(ImageSpec(path=top), (CacheSettings(64 * K),)))
    assert not same(v), same(v)
    row = replay(trace, Scenario(ImageSpec(path=top), (CacheSettings(64 * K),))).rows[0]
    assert row["backing_depth"] == 2 and row["backing2_l2_lookups"] > 0 and row["exact"]


@pytest.mark.qemu
def test_qcow2_over_raw_and_a_shorter_middle_layer(tmp_path, qemu_prefix):
    qemu = qemu_prefix
    """A raw base has data everywhere up to its end (no cache); past a layer's end QEMU reads zeroes, and its zero
    check counts them as allocated there. Layers of other cluster sizes answer with their own slices. The top
    names its backing file by a path with '..' in it, resolved against the top's folder."""
    raw, mid, top = str(tmp_path / "base.raw"), str(tmp_path / "mid.qcow2"), str(tmp_path / "sub" / "top.qcow2")
    os.makedirs(tmp_path / "sub")
    with open(raw, "wb") as f:
        f.truncate(384 * M + 1000)  # not a whole number of sectors: QEMU rounds the length up
        f.seek(4096)
        f.write(b"x" * 65536)
    create(qemu, mid, 768 * M, backing="base.raw", fmt="raw", cluster="16k")
    fill(qemu, mid, 768 * M, 200, 4, pattern=2)
    create(qemu, top, G, backing="../mid.qcow2", cluster="4k")
    trace = mixed(G, 2000, 5)
    for image in (top, mid):
        v = validate(trace if image == top else trace.select(trace.end <= 768 * M),
                     Scenario(ImageSpec(path=image), (CacheSettings(64 * K),)))
        assert not same(v), (image, same(v))
    layers = backing_chain(open_image(top))
    assert [(layer.format, layer.virtual_size) for layer in layers] == [("qcow2", 768 * M), ("raw", 384 * M + 1024)]


@pytest.mark.qemu
def test_a_backing_node_gets_its_own_cache_options(tmp_path, qemu_prefix):
    qemu = qemu_prefix
    """The top's l2-cache-size is not the backing node's (bdrv_backing_options passes no cache option down);
    backing.l2-cache-size sets it, in QEMU as in qsim."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    create(qemu, base, 4 * G)
    fill(qemu, base, 4 * G, 1500, 6, lengths=(64 * K,))
    create(qemu, top, backing="base.qcow2")
    trace = mixed(4 * G, 2000, 7)
    scenario = Scenario(ImageSpec(path=top), (CacheSettings(32 * K),), backing_caches=(CacheSettings(8 * K),))
    v = validate(trace, scenario)
    assert not same(v), same(v)
    small = replay(trace, scenario).rows[0]
    default = replay(trace, Scenario(ImageSpec(path=top), (CacheSettings(32 * K),))).rows[0]
    assert small["backing_l2_cache_entries"] == 2 and default["backing_l2_cache_entries"] == 8
    assert small["backing_l2_misses"] > default["backing_l2_misses"]


def test_synthetic_backing_still_has_data_everywhere():
    """-o backing=on: COW copies from a backing file with data everywhere (no chain to walk)."""
    from qsim.imageopts import ImageOptions

    trace = Trace.from_arrays([WRITE] * 3, [4096, M + 512, 5 * M], [4096, 512, 4096])
    on = replay(trace, Scenario.of((None,), None, ImageOptions(backing=True), G)).rows[0]
    off = replay(trace, Scenario.of((None,), None, ImageOptions(), G)).rows[0]
    assert on["cow_read_bytes"] > 0 and on["zero_fill_bytes"] == 0 and on["backing_depth"] == 1
    assert off["cow_read_bytes"] == 0 and off["zero_fill_bytes"] > 0


def test_chain_errors_say_what_qemu_would(tmp_path):
    """A backing file QEMU could not open, or a loop, is an error naming the file; not a guess."""
    from pathlib import Path

    data = bytearray((Path(__file__).resolve().parent / "fixtures" / "small-64k.qcow2").read_bytes())
    name = b"missing.qcow2"
    data[8:20] = (0x200).to_bytes(8, "big") + len(name).to_bytes(4, "big")  # backing file offset and size
    data[0x200:0x200 + len(name)] = name
    path = tmp_path / "top.qcow2"
    path.write_bytes(bytes(data))
    with pytest.raises(QsimError, match="missing.qcow2 is not readable"):
        backing_chain(open_image(str(path)))
    (tmp_path / "missing.qcow2").write_bytes(bytes(data))  # names itself: a loop
    with pytest.raises(QsimError, match="loop"):
        backing_chain(open_image(str(path)))
