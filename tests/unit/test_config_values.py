"""Unit and property tests for the config's scalar value parsers (pacslb/config/values.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacslb.config.values import (
    HostPort,
    format_duration,
    parse_ae_title,
    parse_duration,
    parse_host_port,
    parse_prefix,
)

# --- durations -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("0.25s", 0.25),
        ("0s", 0.0),
        ("0ms", 0.0),
        ("  2s  ", 2.0),
        ("1d2h3m4s5ms", 86400 + 7200 + 180 + 4 + 0.005),
    ],
)
def test_parse_duration_accepts_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bare", [2, 0, 30, 2.5, True, False, None, [1], {"s": 1}])
def test_parse_duration_refuses_values_without_a_unit(bare: object) -> None:
    with pytest.raises(ValueError, match="needs a unit"):
        parse_duration(bare)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "2",
        "30",
        "s",
        "ms",
        "2 s",
        "2sec",
        "2S",
        "2x",
        "-2s",
        "+2s",
        ".5s",
        "5.s",
        "1e3s",
        "2s ms",
        "h1",
    ],
)
def test_parse_duration_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_parse_duration_error_quotes_the_value() -> None:
    with pytest.raises(ValueError, match="'2 minutes'"):
        parse_duration("2 minutes")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.5, "500ms"),
        (1.0, "1s"),
        (2.0, "2s"),
        (90.0, "90s"),
        (60.0, "1m"),
        (1800.0, "30m"),
        (5400.0, "90m"),
        (3600.0, "1h"),
        (43200.0, "12h"),
        (86400.0, "1d"),
        (172800.0, "2d"),
        (1.5, "1500ms"),
        (0.0, "0ms"),
    ],
)
def test_format_duration_shortest_spelling(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


_UNITS = st.sampled_from(["ms", "s", "m", "h", "d"])


@given(st.integers(min_value=0, max_value=10**6), _UNITS)
def test_duration_round_trip_whole_units(amount: int, unit: str) -> None:
    seconds = parse_duration(f"{amount}{unit}")
    spelled = format_duration(seconds)
    assert parse_duration(spelled) == pytest.approx(seconds, rel=1e-12, abs=1e-9)
    assert re.fullmatch(r"\d+(ms|s|m|h|d)", spelled), spelled


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=999), _UNITS), min_size=1, max_size=5))
def test_duration_combination_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    expected = sum(parse_duration(f"{n}{u}") for n, u in parts)
    assert parse_duration(text) == pytest.approx(expected)


@settings(max_examples=50)
@given(st.integers(min_value=0, max_value=10**9))
def test_bare_integers_are_always_refused(number: int) -> None:
    with pytest.raises(ValueError):
        parse_duration(number)
    with pytest.raises(ValueError):
        parse_duration(str(number))


# --- host:port -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.11:104", "10.0.0.11", 104),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
        (" 10.0.0.1:104 ", "10.0.0.1", 104),
        ("10.0.0.1:0104", "10.0.0.1", 104),
        ("[fd00::11]:104", "fd00::11", 104),
        ("[::]:80", "::", 80),
        ("[::1]:8080", "::1", 8080),
        ("[FD00:0:0::11]:104", "fd00::11", 104),  # normalised to the canonical spelling
    ],
)
def test_parse_host_port_valid(text: str, host: str, port: int) -> None:
    assert parse_host_port(text) == HostPort(host, port)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10.0.0.11", "expected 'address:port'"),
        (":104", "expected 'address:port'"),
        ("", "expected 'address:port'"),
        ("pacs1.example.org:104", "not an IP address"),
        ("localhost:104", "not an IP address"),
        ("10.0.0.256:104", "not an IP address"),
        ("10.0.0:104", "not an IP address"),
        ("[pacs1]:104", "not an IP address"),
        ("10.0.0.1:0", "port must be"),
        ("10.0.0.1:65536", "port must be"),
        ("10.0.0.1:-1", "port must be"),
        ("10.0.0.1:http", "port must be"),
        ("10.0.0.1:", "port must be"),
        ("10.0.0.1: 104", "port must be"),
        ("[::1]:", "port must be"),
        ("[::1]104", "expected 'address:port'"),
    ],
)
def test_parse_host_port_invalid(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_host_port(text)


@pytest.mark.parametrize("value", [104, 10.5, None, True, ["10.0.0.1", 104], {"host": "10.0.0.1"}])
def test_parse_host_port_refuses_non_strings(value: object) -> None:
    with pytest.raises(ValueError, match="expected 'address:port'"):
        parse_host_port(value)


def test_parse_host_port_passes_host_port_through() -> None:
    hp = HostPort("10.0.0.1", 104)
    assert parse_host_port(hp) is hp


def test_host_port_str_and_family() -> None:
    assert str(HostPort("10.0.0.1", 104)) == "10.0.0.1:104"
    assert str(HostPort("fd00::1", 104)) == "[fd00::1]:104"
    assert HostPort("fd00::1", 1).family_v6 is True
    assert HostPort("10.0.0.1", 1).family_v6 is False


def test_host_port_is_frozen() -> None:
    hp = HostPort("10.0.0.1", 104)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.port = 105  # type: ignore[misc]


@settings(max_examples=50)
@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535))
def test_host_port_str_round_trips(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    parsed = parse_host_port(str(HostPort(str(ip), port)))
    assert parsed == HostPort(str(ip), port)
    assert parse_host_port(str(parsed)) == parsed
    assert parsed.family_v6 == (ip.version == 6)


@settings(max_examples=50)
@given(st.ip_addresses(), st.integers().filter(lambda p: not 1 <= p <= 65535))
def test_out_of_range_ports_are_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    with pytest.raises(ValueError, match="port must be"):
        parse_host_port(text)


# --- netmasks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bits", "prefix"),
    [
        (24, 32, 24),
        (0, 32, 0),
        (32, 32, 32),
        ("24", 32, 24),
        ("/24", 32, 24),
        (" 16 ", 32, 16),
        ("255.255.255.0", 32, 24),
        ("255.255.0.0", 32, 16),
        ("255.255.255.255", 32, 32),
        ("255.255.255.128", 32, 25),
        (64, 128, 64),
        (128, 128, 128),
        (0, 128, 0),
        ("64", 128, 64),
        ("/48", 128, 48),
    ],
)
def test_parse_prefix_valid(value: object, bits: int, prefix: int) -> None:
    assert parse_prefix(value, bits=bits) == prefix


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        (33, 32),
        (-1, 32),
        (129, 128),
        ("33", 32),
        ("129", 128),
        ("255.0.255.0", 32),
        ("255.255.255.1", 32),
        ("abc", 32),
        ("", 32),
        ("ffff:ffff::", 128),
        ("255.255.255.0", 128),
        (24.0, 32),
        (True, 32),
        (False, 128),
        (None, 32),
    ],
)
def test_parse_prefix_invalid(value: object, bits: int) -> None:
    with pytest.raises(ValueError):
        parse_prefix(value, bits=bits)


@given(st.integers(min_value=0, max_value=32))
def test_dotted_mask_and_length_agree(prefix: int) -> None:
    dotted = str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    assert parse_prefix(dotted, bits=32) == prefix
    assert parse_prefix(prefix, bits=32) == prefix
    assert parse_prefix(str(prefix), bits=32) == prefix


# --- AE titles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "title"),
    [
        ("PACSLB", "PACSLB"),
        ("ANY-SCP", "ANY-SCP"),
        ("A", "A"),
        ("ABCDEFGHIJKLMNOP", "ABCDEFGHIJKLMNOP"),  # 16, the most PS3.5 allows
        ("  STORESCU", "STORESCU"),  # leading and trailing spaces are not significant
        ("MY AE ", "MY AE"),
        ("lower_case.1", "lower_case.1"),
    ],
)
def test_parse_ae_title_valid(value: str, title: str) -> None:
    assert parse_ae_title(value) == title


@pytest.mark.parametrize(
    "value",
    ["", "    ", "ABCDEFGHIJKLMNOPQ", "A\\B", "A\tB", "A\nB", "ÄRZTE", "A\x7f", 12, None, b"PACS"],
)
def test_parse_ae_title_invalid(value: object) -> None:
    with pytest.raises(ValueError):
        parse_ae_title(value)


@settings(max_examples=50)
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"), max_size=16))
def test_ae_title_of_printable_ascii(title: str) -> None:
    if title:
        assert parse_ae_title(title) == title
    else:
        with pytest.raises(ValueError):
            parse_ae_title(title)


@settings(max_examples=50)
@given(st.text(min_size=17, max_size=40).filter(lambda t: len(t.strip()) > 16))
def test_ae_titles_longer_than_16_are_refused(title: str) -> None:
    # (Leading and trailing spaces are padding, not part of the title (PS3.5 6.2): "0000000000000000 " is
    # a title of 16 characters, accepted.)
    with pytest.raises(ValueError):
        parse_ae_title(title)
