import pytest

from snapimg.errors import UsageError
from snapimg.units import format_size, parse_block_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64K", 65536),
        ("64KiB", 65536),
        ("1m", 1 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        (" 8 K ", 8192),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "-1", "1.5G", "12X", "64 KB extra"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bad max size"):
        parse_size(text, "max size")


def test_block_size_bounds() -> None:
    assert parse_block_size("4K") == 4096
    assert parse_block_size("1M") == 1 << 20
    for bad in ("2K", "2M", "48K"):
        with pytest.raises(UsageError, match="power of two"):
            parse_block_size(bad)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(65536) == "64.0 KiB"
    assert format_size(3 << 30) == "3.0 GiB"
