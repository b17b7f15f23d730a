import itertools
import json
import subprocess

import pytest

from qsim.errors import QsimError
from qsim.geometry import ImageGeometry, measure
from qsim.units import parse_size


@pytest.mark.parametrize(
    "size, cluster, required, fully",
    [  # QEMU's iotest 190
        ("2T", "64k", 335806464, 2199359062016),
        ("2T", "2M", 18874368, 2199042129920),
        ("10M", "64k", 327680, 10813440),
    ],
)
def test_measure_matches_qemu_iotest_190(size, cluster, required, fully):
    m = measure(ImageGeometry(parse_size(size), parse_size(cluster)))
    assert (m.required, m.fully_allocated) == (required, fully)
    assert m.metadata_bytes == m.required


def test_geometry_counts():
    g = ImageGeometry(parse_size("4T"), 2 << 20, extended_l2=True)
    assert g.l2_entry_bytes == 16
    assert g.subcluster_size == 64 * 1024
    assert g.l2_entries_per_table == 131072
    assert g.bytes_per_l2_table == 256 << 30
    assert g.full_l2_cache_bytes == 32 << 20


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cluster_size=3072), "power of two between 512 and 2048k"),
        (dict(cluster_size=4 << 20), "power of two between 512 and 2048k"),
        (dict(cluster_size=8192, extended_l2=True), "at least 16384 bytes"),
        (dict(refcount_bits=3), "may not exceed 64 bits"),
        (dict(refcount_bits=128), "may not exceed 64 bits"),
    ],
)
def test_geometry_refuses_what_qemu_refuses(kwargs, message):
    with pytest.raises(QsimError, match=message):
        ImageGeometry(1 << 30, **kwargs)


def test_measure_refuses_l1_beyond_32m():
    with pytest.raises(QsimError, match="too large"):
        measure(ImageGeometry(16 << 40, 4096))


SIZES = ["1M", "1000", "10M", "1.5G", "100G", "1T", "16T"]
CLUSTERS = ["512", "4k", "16k", "64k", "128k", "2M"]
REFCOUNT_BITS = [1, 16, 64]


@pytest.mark.qemu
def test_measure_matches_live_qemu_img(qemu_img):
    """Every size x cluster size x extended_l2 x refcount width: same numbers or the same refusal as qemu-img."""
    checked = 0
    for size, cluster, ext, bits in itertools.product(SIZES, CLUSTERS, (False, True), REFCOUNT_BITS):
        if bits != 16 and size not in ("10M", "1T"):
            continue
        opts = f"cluster_size={cluster},extended_l2={'on' if ext else 'off'},refcount_bits={bits}"
        proc = subprocess.run([qemu_img, "measure", "-O", "qcow2", "--size", size, "-o", opts, "--output=json"],
                              capture_output=True, text=True)
        try:
            g = ImageGeometry(parse_size(size), parse_size(cluster), ext, bits)
            m = measure(g)
            ours = {"required": m.required, "fully-allocated": m.fully_allocated}
        except QsimError:
            ours = None
        if proc.returncode != 0:
            assert ours is None, f"{size} {opts}: qemu-img refused ({proc.stderr.strip()}) but qsim did not"
        else:
            assert ours == json.loads(proc.stdout), f"{size} {opts}"
            checked += 1
    assert checked > 60
