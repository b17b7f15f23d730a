import pytest

from qsim.cachecfg import CacheSettings, largest_covered_disk, resolve_cache, cache_for_coverage
from qsim.errors import QsimError
from qsim.geometry import ImageGeometry
from qsim.units import parse_size as S


def cache(size, cluster="64k", ext=False, version="7.2", **settings):
    g = ImageGeometry(S(size), S(cluster), ext)
    return resolve_cache(g, CacheSettings(**{k: S(v) for k, v in settings.items()}), version)


@pytest.mark.parametrize(
    "size, cluster, ext, entries, entry_size",
    [  # defaults observed on QEMU 7.2 (shared/qemu-behaviour.md)
        ("2G", "64k", False, 4, "64k"),
        ("100G", "64k", False, 200, "64k"),
        ("1T", "64k", False, 8192, "4k"),
        ("256G", "64k", True, 8192, "4k"),
        ("4T", "2M", False, 8, "2M"),
        ("32G", "2M", False, 2, "2M"),
    ],
)
def test_qemu_7_2_defaults(size, cluster, ext, entries, entry_size):
    c = cache(size, cluster, ext)
    assert (c.l2_cache_entries, c.l2_cache_entry_size) == (entries, S(entry_size))
    assert c.refcount_cache_entries == 4


def test_given_cache_is_capped_at_the_whole_disk():
    c = cache("2G", l2_cache_size="1M")
    assert (c.l2_cache_bytes, c.l2_cache_entries, c.l2_cache_entry_size) == (S("256k"), 4, S("64k"))


@pytest.mark.parametrize("l2", ["0", "512"])
def test_tiny_cache_is_clamped_to_two_entries(l2):
    c = cache("2G", l2_cache_size=l2)
    assert c.l2_cache_entries == 2 and c.l2_cache_entry_size == 4096


def test_partial_cache_switches_to_4k_slices_unless_entry_size_given():
    assert cache("1G", l2_cache_size="8k").l2_cache_entries == 2
    assert cache("1G", l2_cache_size="12k").l2_cache_entries == 3
    full = cache("1G", l2_cache_size="128k")
    assert (full.l2_cache_entries, full.l2_cache_entry_size) == (2, S("64k"))
    forced = cache("2G", l2_cache_size="128k", l2_cache_entry_size="64k")
    assert (forced.l2_cache_entries, forced.l2_cache_entry_size) == (2, S("64k"))


def test_exact_fit_and_one_byte_less():
    g = ImageGeometry(S("1T"), S("64k"))
    exact = resolve_cache(g, CacheSettings(l2_cache_size=g.full_l2_cache_bytes))
    assert exact.covers_disk and exact.l2_cache_entry_size == S("64k")
    less = resolve_cache(g, CacheSettings(l2_cache_size=g.full_l2_cache_bytes - 1))
    assert not less.covers_disk and less.l2_cache_entry_size == 4096


def test_combined_cache_size_splits_like_qemu():
    c = cache("2G", cache_size="1M")  # enough for the whole L2 (256k) + 4 refcount clusters
    assert c.l2_cache_bytes == S("256k") and c.refcount_cache_bytes == S("768k")
    small = cache("2G", cache_size="200k")
    assert small.refcount_cache_entries == 4  # min(200k, 4 clusters) = 200k, then the 4-entry minimum
    assert small.l2_cache_bytes == 0 and small.l2_cache_entries == 2
    split = cache("2G", cache_size="1M", l2_cache_size="128k")
    assert split.l2_cache_bytes == S("128k") and split.refcount_cache_bytes == S("896k")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(cache_size="1M", l2_cache_size="512k", refcount_cache_size="256k"), "may not be set at the same time"),
        (dict(cache_size="1M", l2_cache_size="2M"), "l2-cache-size may not exceed cache-size"),
        (dict(cache_size="1M", refcount_cache_size="2M"), "refcount-cache-size may not exceed cache-size"),
        (dict(l2_cache_entry_size="3k"), "power of two between 512 and the cluster size"),
        (dict(l2_cache_entry_size="128k"), "power of two between 512 and the cluster size"),
        (dict(l2_cache_entry_size="256"), "power of two between 512 and the cluster size"),
    ],
)
def test_qemu_errors(settings, message):
    with pytest.raises(QsimError, match=message):
        cache("2G", **settings)


def test_older_qemu_defaults():
    assert cache("100G", version="2.11").l2_cache_bytes == S("1M")
    assert cache("100G", version="2.11").refcount_cache_bytes == S("256k")
    assert cache("100G", "2M", version="2.11").l2_cache_bytes == S("16M")  # 8 clusters beat 1 MiB
    assert cache("100G", version="3.0").refcount_cache_entries == 4
    assert cache("1T", version="3.1").l2_cache_entry_size == S("64k")  # 4 KiB slices came in 4.0
    assert cache("1T", version="4.0").l2_cache_entry_size == 4096
    with pytest.raises(QsimError, match="5.2"):
        cache("1T", ext=True, version="5.1")


def test_coverage_queries():
    g = ImageGeometry(S("1T"), S("64k"))
    half = cache_for_coverage(g, 0.5)
    assert half == S("64M")
    assert resolve_cache(g, CacheSettings(l2_cache_size=half)).covered_fraction == 0.5
    assert cache_for_coverage(g, 1.0) == g.full_l2_cache_bytes
    assert largest_covered_disk(S("32M"), S("64k"), False) == S("256G")
    assert largest_covered_disk(S("32M"), S("64k"), True) == S("128G")
    assert largest_covered_disk(S("32M"), S("2M"), True) == S("4T")
