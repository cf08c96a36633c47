"""Tests for secretless_proxy.config.durations: the unit-suffixed TTLs of the command line."""

from __future__ import annotations

from datetime import timedelta

import pytest

from secretless_proxy.config.durations import parse_ttl


class TestParseTtl:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("90s", timedelta(seconds=90)),
            ("15m", timedelta(minutes=15)),
            ("1h", timedelta(hours=1)),
            ("7d", timedelta(days=7)),
            ("1h30m", timedelta(hours=1, minutes=30)),
            ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ],
    )
    def test_good(self, text: str, expected: timedelta) -> None:
        """Unit-suffixed durations parse to the right timedelta."""
        assert parse_ttl(text) == expected

    @pytest.mark.parametrize("text", ["", "1", "h", "1w", "-1h", "1.5h", "30m1h", "1 h", "1H"])
    def test_bad(self, text: str) -> None:
        """Malformed durations are refused with a usage hint."""
        with pytest.raises(ValueError, match=r"invalid TTL .*: use e\.g\. 90s, 15m, 1h, 7d"):
            parse_ttl(text)

    @pytest.mark.parametrize("text", ["0s", "0h0m"])
    def test_zero(self, text: str) -> None:
        """A zero duration is refused."""
        with pytest.raises(ValueError, match="must be greater than zero"):
            parse_ttl(text)
