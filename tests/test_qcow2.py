"""Real qcow2 images: the reader against qemu-img info / map, replay on real images against qemu-io, hostile and
damaged images, and the read-only guarantee. Fixtures in tests/fixtures run without QEMU."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsim.errors import QsimError
from qsim.image import image_from_qcow2
from qsim.inspect import guest_map, inspect_image
from qsim.qcow2 import open_image
from qsim.cachecfg import CacheSettings
from qsim.replay import replay
from qsim.scenario import ImageSpec, Scenario
from qsim.traceio import read_trace
from qsim.validate import COMPARED, validate

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TRACES = Path(__file__).resolve().parent.parent / "traces"
K, M, G = 1 << 10, 1 << 20, 1 << 30


def test_fixture_small_64k():
    info = inspect_image(str(FIXTURES / "small-64k.qcow2"))
    assert (info["version"], info["virtual_size"], info["cluster_size"], info["extended_l2"]) == (3, G, 64 * K, False)
    assert (info["l2_tables"], info["clusters_allocated"], info["clusters_zero"], info["clusters_compressed"]) == \
        (2, 4, 1, 0)
    assert info["host_runs"] == 2 and info["backing_file"] is None
    extents = guest_map(str(FIXTURES / "small-64k.qcow2"))
    assert extents[0] == {"start": 0, "length": 192 * K, "depth": 0, "present": True, "zero": False, "data": True,
                          "compressed": False, "offset": 0x50000}
    assert extents[2]["start"] == 512 * M and extents[2]["zero"] and extents[2]["present"]


def test_fixture_extended_l2_subclusters():
    info = inspect_image(str(FIXTURES / "small-ext-128k.qcow2"))
    assert info["extended_l2"] and info["cluster_size"] == 128 * K
    assert (info["subclusters_allocated"], info["subclusters_zero"]) == (1, 1)
    extents = guest_map(str(FIXTURES / "small-ext-128k.qcow2"))
    data = [e for e in extents if e["data"]]
    assert len(data) == 1 and data[0]["start"] == M and data[0]["length"] == 4 * K


def test_fixture_compressed():
    info = inspect_image(str(FIXTURES / "small-compressed.qcow2"))
    assert info["clusters_compressed"] == 4 and info["clusters_allocated"] == 0


def test_replay_on_fixture_differs_from_fresh_image():
    state = image_from_qcow2(open_image(str(FIXTURES / "small-64k.qcow2")))
    t = read_trace(str(TRACES / "synth-zipf-read-4k.iolog.gz"))
    t = t.select(t.offset < G - 4 * K)
    r = replay(t, state=state).rows[0]
    assert r["virtual_size"] == G and r["l2_lookups"] > 0  # the image's two tables cost lookups; a fresh image none


@pytest.mark.qemu
@pytest.mark.parametrize("cluster, ext", [("64k", False), ("128k", True), ("2M", False), ("2M", True)])
def test_reader_matches_qemu_img_info_and_map(tmp_path, qemu_img, qemu_io, cluster, ext):
    path = str(tmp_path / "img.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster},extended_l2={'on' if ext else 'off'}", path, "20G"], check=True)
    cmds = ["write -q -P 1 0 3M", "write -q -P 2 5G 64k", "write -q -z 7G 1M", "write -q -P 3 7G 4k",
            "write -q -P 4 12345678848 12k", "discard -q 0 64k"]
    subprocess.run([qemu_io, *sum((["-c", c] for c in cmds), []), path], check=True, capture_output=True)
    info = json.loads(subprocess.run([qemu_img, "info", "--output=json", path], capture_output=True,
                                     text=True).stdout)
    ours = inspect_image(path)
    assert ours["virtual_size"] == info["virtual-size"] and ours["cluster_size"] == info["cluster-size"]
    assert ours["extended_l2"] == info["format-specific"]["data"]["extended-l2"]
    assert ours["refcount_bits"] == info["format-specific"]["data"]["refcount-bits"]
    theirs = json.loads(subprocess.run([qemu_img, "map", "--output=json", path], capture_output=True,
                                       text=True).stdout)
    mine = [{k: v for k, v in e.items() if k != "compressed"} for e in guest_map(path)]
    assert mine == theirs


@pytest.mark.qemu
def test_backing_chain_and_compressed(tmp_path, qemu_img, qemu_io):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    packed = str(tmp_path / "packed.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", base, "4G"], check=True)
    subprocess.run([qemu_io, "-c", "write -q -P 9 0 1M", base], check=True, capture_output=True)
    subprocess.run([qemu_img, "convert", "-c", "-O", "qcow2", base, packed], check=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top], check=True)
    info = inspect_image(top)
    assert info["backing_file"] == "base.qcow2" and info["backing_format"] == "qcow2"
    assert info["backing_chain"][0]["path"].endswith("base.qcow2")
    assert info["backing_chain"][0]["virtual_size"] == 4 * G
    assert inspect_image(packed)["clusters_compressed"] == 16
    theirs = json.loads(subprocess.run([qemu_img, "map", "--output=json", packed], capture_output=True,
                                       text=True).stdout)
    assert [{k: v for k, v in e.items() if k != "compressed"} for e in guest_map(packed)] == theirs


@pytest.mark.qemu
@pytest.mark.parametrize("cluster, ext, mode", [("64k", False, "writeback"), ("128k", True, "writethrough")])
def test_replay_on_a_real_used_image_matches_qemu(tmp_path, qemu_img, qemu_io, cluster, ext, mode):
    path = str(tmp_path / "used.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={cluster},extended_l2={'on' if ext else 'off'}", path, "8G"], check=True)
    rng = np.random.default_rng(5)
    offsets = rng.integers(0, (8 * G - 256 * K) // 4096, 1500) * 4096
    sizes = rng.choice([4 * K, 64 * K, 256 * K], 1500)
    cmds = "".join(f"write -q -P 0x5 {o} {s}\n" for o, s in zip(offsets, sizes))
    subprocess.run([qemu_io, path], input=cmds, text=True, check=True, capture_output=True)
    before = Path(path).read_bytes()
    trace = read_trace(str(TRACES / "fio-randrw-mixed-fsync.iolog.gz"))
    v = validate(trace, Scenario(ImageSpec(path=path), (CacheSettings(64 * K),), cache_mode=mode))
    assert {k: v.qsim[k] for k in COMPARED} == {k: v.qemu[k] for k in COMPARED}
    assert Path(path).read_bytes() == before  # validate worked on a scratch copy


def test_inspect_and_replay_leave_the_image_untouched(tmp_path):
    path = tmp_path / "img.qcow2"
    shutil.copyfile(FIXTURES / "small-64k.qcow2", path)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    before = path.read_bytes()
    for argv in (["inspect", str(path)], ["inspect", str(path), "--map"],
                 ["replay", str(TRACES / "fio-randrw-mixed-fsync.iolog.gz"), "--image", str(path),
                  "--offset-policy", "wrap"]):
        proc = subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert path.read_bytes() == before
    assert os.stat(path).st_mtime == 1_000_000_000


# --- hostile and damaged images -----------------------------------------------------------------------------------

def patched(tmp_path, offset, fmt, value, source="small-64k.qcow2", truncate=None):
    data = bytearray((FIXTURES / source).read_bytes())
    if fmt:
        struct.pack_into(fmt, data, offset, value)
    if truncate is not None:
        data = data[:truncate]
    path = tmp_path / "bad.qcow2"
    path.write_bytes(bytes(data))
    return str(path)


L1_OFFSET = 0x30000  # small-64k.qcow2's L1 table


@pytest.mark.parametrize(
    "offset, fmt, value, truncate, message",
    [
        (0, ">I", 0x12345678, None, "not a qcow2 image"),
        (4, ">I", 7, None, "version 7 is not supported"),
        (20, ">I", 30, None, "cluster_bits 30"),
        (24, ">Q", 1 << 63, None, "absurd"),
        (36, ">I", 0x7FFFFFFF, None, "exceeds QEMU's 32 MiB limit"),
        (36, ">I", 1, None, "needs 2"),
        (40, ">Q", 0x40000000, None, "L1 table at offset 0x40000000"),
        (40, ">Q", 0x30001, None, "not cluster-aligned"),
        (56, ">I", 0x7FFFFFFF, None, "larger than the file"),
        (72, ">Q", 1 << 40, None, "unknown incompatible features"),
        (0, None, 0, 100, "truncated"),
        (0, None, 0, 0x38000, "beyond the end of the file"),
        (L1_OFFSET, ">Q", 0x8000000000000200, None, "not cluster-aligned"),
        (L1_OFFSET, ">Q", 1 << 63, None, None),
        (L1_OFFSET + 8, ">Q", 0x8000000000040000, None, "share the L2 table"),
        (L1_OFFSET, ">Q", 0x8000000000000000 | 0x1000000000, None, "beyond the end of the file"),
        (0x40000, ">Q", 0x8000001000000000, None, "past the end of the file"),
    ],
)
def test_hostile_images_give_clear_errors(tmp_path, offset, fmt, value, truncate, message):
    path = patched(tmp_path, offset, fmt, value, truncate=truncate)
    if message is None:  # an L1 entry of 0 with only the COPIED flag: no table, a valid image
        open_image(path)
        return
    with pytest.raises(QsimError, match=message):
        image_from_qcow2(open_image(path))


def test_refcount_table_in_the_header(tmp_path):
    with pytest.raises(QsimError, match="refcount table offset 0x0 points into the header"):
        open_image(patched(tmp_path, 48, ">Q", 0))


def test_encryption_and_dirty_are_warnings(tmp_path):
    path = patched(tmp_path, 32, ">I", 1)
    assert any("encrypted" in w for w in open_image(path).warnings)
    path = patched(tmp_path, 72, ">Q", 1)
    assert any("dirty" in w for w in open_image(path).warnings)
    path = patched(tmp_path, 72, ">Q", 4)
    assert any("external data file" in w for w in open_image(path).warnings)


def test_mutation_fuzz_never_crashes(tmp_path):
    """Flip random bytes in the header, L1, L2 and refcount areas: every outcome is a clean read or a QsimError."""
    original = (FIXTURES / "small-64k.qcow2").read_bytes()
    rng = np.random.default_rng(1234)
    areas = [(0, 112), (0x10000, 0x10040), (0x20000, 0x20040), (0x30000, 0x30020), (0x40000, 0x40040)]
    path = tmp_path / "fuzz.qcow2"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        data = bytearray(original)
        for _ in range(rng.integers(1, 4)):
            lo, hi = areas[rng.integers(len(areas))]
            data[rng.integers(lo, hi)] = int(rng.integers(256))
        path.write_bytes(bytes(data))
        try:
            image_from_qcow2(open_image(str(path)))
            guest_map(str(path))
            outcomes["ok"] += 1
        except QsimError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


@pytest.mark.qemu
@pytest.mark.parametrize("name, l2, mode", [("fio-randrw-mixed-fsync", 64 * K, "writeback"),
                                            ("fio-randwrite-4k", 256 * K, "writethrough")])
def test_backing_chain_replay_matches_qemu(tmp_path, qemu_img, qemu_io, name, l2, mode):
    """What the top image lacks goes to the backing image's own cache, with no flag given: the sum over both
    caches equals what QEMU's trace counts."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", base, "8G"], check=True)
    rng = np.random.default_rng(8)
    cmds = "".join(f"write -q -P 0x7 {o * 4096} 65536\n" for o in rng.integers(0, (8 * G - 64 * K) // 4096, 2000))
    subprocess.run([qemu_io, base], input=cmds, text=True, check=True, capture_output=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top], check=True)
    trace = read_trace(str(TRACES / f"{name}.iolog.gz"))
    trace = trace.select(trace.end <= 8 * G)
    v = validate(trace, Scenario(ImageSpec(path=top), (CacheSettings(l2),), cache_mode=mode))
    assert "l2_evictions" not in v.compared
    assert {k: v.qsim[k] for k in v.compared} == {k: v.qemu[k] for k in v.compared}
    row = replay(trace, Scenario(ImageSpec(path=top), (CacheSettings(l2),), cache_mode=mode)).rows[0]
    assert v.qsim["l2_lookups"] == row["l2_lookups"] + row["backing_l2_lookups"] > row["l2_lookups"]
