import pytest

from qsim.errors import UsageError
from qsim.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512", 512), ("64k", 65536), ("64K", 65536), ("32M", 32 << 20), ("32m", 32 << 20), ("1.5G", 3 << 29),
        ("4T", 4 << 40), ("1P", 1 << 50), ("2E", 2 << 60), ("100b", 100), ("0x1000", 4096), ("1.k", 1024),
        # QEMU rounds the fraction's fixed-point product half up: 0.5 byte -> 1.
        ("1.0000000001k", 1024), (" 7G", 7 << 30),
    ],
)
def test_parse_size_follows_qemu_strtosz(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "k", "1X", "-1", "1.5", "0x10k", "1e3", "8E", "9999999999999999999999", "1 G"])
def test_parse_size_rejects_what_qemu_rejects(text):
    with pytest.raises(UsageError) as err:
        parse_size(text, "--l2-cache-size")
    assert "--l2-cache-size" in str(err.value)


@pytest.mark.parametrize(
    "n, text", [(512, "512"), (65536, "64k"), (32 << 20, "32M"), (3 << 29, "1536M"), (4 << 40, "4T"), (1000, "1000")]
)
def test_format_size_is_exact_and_round_trips(n, text):
    assert format_size(n) == text
    assert parse_size(text) == n
