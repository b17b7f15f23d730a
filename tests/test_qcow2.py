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
    extents = list(guest_map(str(FIXTURES / "small-64k.qcow2"), (10, 0)))
    assert extents[0] == {"start": 0, "length": 192 * K, "depth": 0, "present": True, "zero": False, "data": True,
                          "compressed": False, "offset": 0x50000}
    assert extents[2]["start"] == 512 * M and extents[2]["zero"] and extents[2]["present"]


def test_fixture_extended_l2_subclusters():
    info = inspect_image(str(FIXTURES / "small-ext-128k.qcow2"))
    assert info["extended_l2"] and info["cluster_size"] == 128 * K
    assert (info["subclusters_allocated"], info["subclusters_zero"]) == (1, 1)
    extents = list(guest_map(str(FIXTURES / "small-ext-128k.qcow2"), (10, 0)))
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
    assert list(guest_map(path, (7, 2))) == theirs


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
    assert list(guest_map(packed, (7, 2))) == theirs


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
        (36, ">I", 0x7FFFFFFF, None, "Active L1 table too large"),
        (36, ">I", 1, None, "needs 2"),
        (40, ">Q", 0x40000000, None, "L1 table at offset 0x40000000"),
        (40, ">Q", 0x30001, None, "not cluster-aligned"),
        (56, ">I", 0x7FFFFFFF, None, "Reference count table too large"),
        (72, ">Q", 1 << 40, None, "unknown incompatible features"),
        (0, None, 0, 100, "truncated"),
        (0, None, 0, 0x38000, "beyond the end of the file"),
        (L1_OFFSET, ">Q", 0x8000000000000200, None, "L2 table offset 0x200 unaligned"),
        (L1_OFFSET, ">Q", 1 << 63, None, "points into the header"),  # qemu-img check: corrupt
        (L1_OFFSET + 8, ">Q", 0x8000000000040000, None, "referenced 2 times"),
        (L1_OFFSET, ">Q", 0x8000000000000000 | 0x1000000000, None, "beyond the end of the file"),
        (0x40000, ">Q", 0x8000001000000000, None, "beyond the end of the file"),
    ],
)
def test_hostile_images_give_clear_errors(tmp_path, offset, fmt, value, truncate, message):
    path = patched(tmp_path, offset, fmt, value, truncate=truncate)
    with pytest.raises(QsimError, match=message):
        image_from_qcow2(open_image(path))


def test_refcount_table_in_the_header(tmp_path):
    with pytest.raises(QsimError, match="refcount table at 0x0, entry 0: refcount block offset 0x514649fb00000003"):
        open_image(patched(tmp_path, 48, ">Q", 0))


def test_encryption_and_dirty_are_warnings(tmp_path):
    path = patched(tmp_path, 32, ">I", 1)
    assert any("encrypted" in w for w in open_image(path).warnings)
    path = patched(tmp_path, 72, ">Q", 1)
    assert any("dirty" in w for w in open_image(path).warnings)
    with pytest.raises(QsimError, match="'data-file' is required for this image"):
        open_image(patched(tmp_path, 72, ">Q", 4))  # the data file bit, but no name: QEMU refuses it too


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
            list(guest_map(str(path)))
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


# --- issue 19's reproducers ------------------------------------------------------------------------------------------

def test_unaligned_l2_entry_is_corrupt_not_data(tmp_path):
    path = patched(tmp_path, 0x40000, ">Q", 0x8000000000050200)  # guest cluster 0 -> host 0x50200
    for call in (open_image, inspect_image, lambda p: list(guest_map(p, (7, 2)))):
        with pytest.raises(QsimError, match=r"L2 table at 0x40000, entry 0: cluster allocation offset 0x50200 "
                                            r"unaligned \(QEMU: \"Image is corrupt"):
            call(path)
    proc = subprocess.run([sys.executable, "-m", "qsim", "inspect", path, "--map"], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_huge_sparse_file_costs_nothing_for_its_holes(tmp_path):
    """A small image truncated to a huge sparse size: no refcount per host cluster, no table per hole."""
    import tracemalloc

    path = tmp_path / "huge.qcow2"
    shutil.copyfile(FIXTURES / "small-64k.qcow2", path)
    for size in (1 << 50, 1 << 44, 1 << 40):  # 1 PiB where the file system allows it
        try:
            os.truncate(path, size)
            break
        except OSError:
            continue
    tracemalloc.start()
    try:
        info = inspect_image(str(path))
        extents = list(guest_map(str(path), (7, 2)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info["file_bytes"] == os.path.getsize(path) and extents[0]["data"]
    assert peak < 32 * M, peak


def _chain(tmp_path, qemu_img, qemu_io, name="base.qcow2"):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    subprocess.run([qemu_io, "-c", "write -q -P 1 0 64k", str(base)], check=True, capture_output=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", str(top), "1G"],
                   check=True)
    return base, top


@pytest.mark.qemu
def test_nul_in_backing_file_name_ends_it_as_in_qemu(tmp_path, qemu_img, qemu_io):
    base, top = _chain(tmp_path, qemu_img, qemu_io)
    data = bytearray(top.read_bytes())
    offset, size = struct.unpack_from(">QI", data, 8)
    data[offset + size: offset + size + 3] = b"\0zz"
    struct.pack_into(">I", data, 16, size + 3)
    top.write_bytes(bytes(data))
    assert subprocess.run([qemu_img, "info", str(top)], capture_output=True).returncode == 0
    assert inspect_image(str(top))["backing_file"] == "base.qcow2"
    theirs = subprocess.run([qemu_img, "map", "--output=json", str(top)], capture_output=True, text=True).stdout
    ours = subprocess.run([sys.executable, "-m", "qsim", "inspect", str(top), "--map", "--output=json",
                           "--qemu-version", "7.2"], capture_output=True, text=True).stdout
    assert ours == theirs and '"depth": 1' in ours


@pytest.mark.qemu
def test_backing_loop_and_fifo_are_refused_at_once(tmp_path, qemu_img, qemu_io):
    base, top = _chain(tmp_path, qemu_img, qemu_io)
    subprocess.run([qemu_img, "rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", str(base)], check=True)
    trace = str(TRACES / "fio-randwrite-4k.iolog.gz")
    for argv in (["validate", trace, "--image", str(top), "--offset-policy", "wrap"], ["inspect", str(top), "--map"]):
        proc = subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "infinite loop" in proc.stderr and "Traceback" not in proc.stderr, argv
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    subprocess.run([qemu_img, "rebase", "-u", "-b", "fifo", "-F", "qcow2", str(top)], check=True)
    info = inspect_image(str(top))  # does not block: the chain lists the FIFO as an error
    assert "FIFO" in info["backing_chain"][0]["error"]
    for argv in (["validate", trace, "--image", str(top), "--offset-policy", "wrap"], ["inspect", str(top), "--map"],
                 ["replay", trace, "--image", str(top), "--backing-chain", "--offset-policy", "wrap"]):
        proc = subprocess.run([sys.executable, "-m", "qsim", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "FIFO" in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)


@pytest.mark.qemu
def test_external_data_file_reader_view_and_validate_leaves_it_alone(tmp_path, qemu_img, qemu_io):
    path, data = tmp_path / "img.qcow2", tmp_path / "data.raw"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(path), "1G"], check=True)
    subprocess.run([qemu_io, "-c", "write -q -P 7 0 64k", "-c", "write -q -P 7 100M 4k", str(path)], check=True,
                   capture_output=True)
    img = open_image(str(path))
    assert img.has_data_file and img.data_file == str(data) and img.data_bytes == data.stat().st_size
    theirs = json.loads(subprocess.run([qemu_img, "map", "--output=json", str(path)], capture_output=True,
                                       text=True).stdout)
    ours = list(guest_map(str(path), (7, 2)))
    assert ours == theirs and ours[0] == {"start": 0, "length": 65536, "depth": 0, "present": True, "zero": False,
                                          "data": True, "offset": 0}  # guest cluster 0 at host offset 0 is data
    before = (path.read_bytes(), data.read_bytes(), data.stat().st_mtime_ns)
    trace = str(TRACES / "fio-randwrite-4k.iolog.gz")
    proc = subprocess.run([sys.executable, "-m", "qsim", "validate", trace, "--image", str(path), "--offset-policy",
                           "wrap"], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr
    assert (path.read_bytes(), data.read_bytes(), data.stat().st_mtime_ns) == before


def _qemu_img_builds():
    """Every qemu-img the suite runs against: QSIM_QEMU_PREFIXES (as CI sets it), else the one on PATH and
    QEMU 10.0 under /opt when it is there."""
    prefixes = os.environ.get("QSIM_QEMU_PREFIXES")
    dirs = prefixes.split(":") if prefixes else [os.path.dirname(shutil.which("qemu-img") or ""),
                                                 "/opt/qemu-10.0/usr/bin"]
    return [os.path.join(d, "qemu-img") for d in dirs if d and os.access(os.path.join(d, "qemu-img"), os.X_OK)]


@pytest.mark.qemu
@pytest.mark.parametrize("tool", _qemu_img_builds() or ["qemu-img"])
def test_map_prints_what_each_qemu_img_prints(tmp_path, qemu_img, qemu_io, tool):
    """Byte for byte, for the version selected (--qemu-version) and for the one found (default)."""
    from qsim.inspect import qemu_img_version

    version = qemu_img_version(tool)
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    raw, over_raw = tmp_path / "base.raw", tmp_path / "over-raw.qcow2"
    ext, packed = tmp_path / "ext.qcow2", tmp_path / "packed.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    subprocess.run([qemu_io, "-c", "write -q -P 1 0 128k", "-c", "write -q -z 600M 64k", str(base)], check=True,
                   capture_output=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top), "2G"],
                   check=True)
    subprocess.run([qemu_io, "-c", "write -q -P 3 64k 128k", "-c", "write -q -z 700M 64k", str(top)], check=True,
                   capture_output=True)
    with open(raw, "wb") as f:
        f.truncate(256 * M)
        f.seek(M)
        f.write(b"x" * 4096)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(over_raw), "512M"],
                   check=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=128k,extended_l2=on", str(ext),
                    "1G"], check=True)
    subprocess.run([qemu_io, "-c", "write -q -P 3 1M 4k", "-c", "write -q -z 512M 4k", str(ext)], check=True,
                   capture_output=True)
    subprocess.run([qemu_img, "convert", "-c", "-O", "qcow2", str(base), str(packed)], check=True)
    for image in (top, over_raw, ext, packed):
        theirs = subprocess.run([tool, "map", "--output=json", str(image)], capture_output=True, text=True)
        assert theirs.returncode == 0, theirs.stderr
        ours = subprocess.run([sys.executable, "-m", "qsim", "inspect", str(image), "--map", "--output=json",
                               "--qemu-version", f"{version[0]}.{version[1]}"], capture_output=True, text=True)
        assert ours.stdout == theirs.stdout, (image.name, version)
        assert ('"compressed"' in ours.stdout) == (version >= (8, 2))
