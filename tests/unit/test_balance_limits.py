"""Unit and property tests for the per-client limits (pacslb/balance/limits.py) and their config section."""

from __future__ import annotations

import itertools
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacslb.balance import limits as limits_module
from pacslb.balance.limits import (
    ANSWER_SLOTS,
    ANSWER_SLOTS_PER_CLIENT,
    ClientLimits,
    Limit,
    RefusalLog,
    client_key,
    retry_after,
)
from pacslb.config import load_config_text
from pacslb.config.model import LimitsSpec
from pacslb.config.values import format_rate, parse_rate
from pacslb.errors import ConfigError


def spec(**fields: object) -> LimitsSpec:
    return LimitsSpec.model_validate(fields)


# --- config ----------------------------------------------------------------------------------------------


def test_defaults_and_their_spelling() -> None:
    s = LimitsSpec()
    assert (s.client_maxconn, s.client_rate, s.client_burst) == (256, 100.0, 1000)
    assert (s.netmask, s.netmask6, s.calling_ae_maxconn, s.client_ae_titles) == (32, 128, 64, 256)
    assert s.model_dump()["client_rate"] == "100/s"


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("100/s", 100.0), ("600/m", 10.0), ("3600/h", 1.0), ("0.5/s", 0.5), (" 20 / s ", 20.0), ("30/m", 0.5)],
)
def test_rates(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)
    assert parse_rate(format_rate(parse_rate(text))) == pytest.approx(per_second)


@pytest.mark.parametrize("text", [100, "100", "100/d", "/s", "0/s", "-1/s", True, "1e3/s"])
def test_bad_rates(text: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["s", "m", "h"]))
def test_rate_round_trip(count: int, unit: str) -> None:
    rate = parse_rate(f"{count}/{unit}")
    assert parse_rate(format_rate(rate)) == pytest.approx(rate)


def test_none_turns_a_limit_off() -> None:
    s = spec(client_maxconn="none", client_rate=None, calling_ae_maxconn="None", client_ae_titles=None)
    assert (s.client_maxconn, s.client_rate, s.calling_ae_maxconn, s.client_ae_titles) == (None, None, None, None)
    assert not s.per_client


def _service(mode: str, limits: str) -> str:
    return textwrap.dedent(f"""\
        services:
          a:
            listen: 127.0.0.1:104
            mode: {mode}
            servers: {{p1: 10.0.0.11:104}}
            limits: {limits}
        """)


def test_the_section_loads_with_located_errors() -> None:
    config = load_config_text(
        _service(
            "dicom",
            "{client_maxconn: 8, client_rate: 600/m, client_burst: 5, netmask: 24, netmask6: 64, "
            "calling_ae_maxconn: 2, client_ae_titles: none}",
        ),
        "f.yaml",
    )
    s = config.services["a"].limits
    assert (s.client_maxconn, s.client_rate, s.client_burst, s.netmask, s.netmask6) == (8, 10.0, 5, 24, 64)
    assert (s.calling_ae_maxconn, s.client_ae_titles) == (2, None)
    for limits, field, reason in [
        ("{per_client: 3}", "services.a.limits.per_client", "unknown key"),
        ("{client_maxconn: 0}", "services.a.limits.client_maxconn", "greater than or equal to 1"),
        ("{client_rate: 100}", "services.a.limits.client_rate", "needs a unit"),
        ("{netmask6: 129}", "services.a.limits.netmask6", "0..128"),
        ("{client_burst: none}", "services.a.limits.client_burst", "integer"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config_text(_service("tcp", limits), "f.yaml")
        [issue] = info.value.issues
        assert (issue.field, issue.line) == (field, 6), str(issue)
        assert reason in issue.reason, str(issue)


@pytest.mark.parametrize("mode", ["tcp", "http"])
def test_the_dicom_limits_are_refused_in_other_modes(mode: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(_service(mode, "{calling_ae_maxconn: 4, client_ae_titles: 4}"), "f.yaml")
    fields = sorted(i.field for i in info.value.issues)
    assert fields == ["services.a.limits.calling_ae_maxconn", "services.a.limits.client_ae_titles"]
    assert all(f"only applies to mode dicom (this service is {mode})" in i.reason for i in info.value.issues)


def test_client_key_follows_the_netmasks() -> None:
    assert client_key("10.1.2.3", spec()) == "10.1.2.3"
    assert client_key("10.1.2.3", spec(netmask=24)) == "10.1.2.0"
    assert client_key("::ffff:10.1.2.3", spec(netmask=16)) == "10.1.0.0"
    assert client_key("2001:db8:1:2:aaaa::1", spec()) == "2001:db8:1:2:aaaa::1"
    assert client_key("2001:db8:1:2:aaaa::1", spec(netmask6=64)) == "2001:db8:1:2::"


# --- connections ---------------------------------------------------------------------------------------


def test_concurrent_connections_per_client() -> None:
    limits = ClientLimits(spec(client_maxconn=2, client_rate=None))
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) is Limit.CLIENT_MAXCONN
    assert limits.admit("b", 0.0) is None  # another client is not affected
    limits.release("a", 1.0)
    assert limits.admit("a", 1.0) is None
    for key in ("a", "a", "b"):
        limits.release(key, 2.0)
    assert len(limits) == 0  # nothing held: nothing kept


def test_token_bucket() -> None:
    limits = ClientLimits(spec(client_maxconn=None, client_rate="10/s", client_burst=3))
    assert [limits.admit("a", 0.0) for _ in range(4)] == [None, None, None, Limit.CLIENT_RATE]
    assert limits.admit("a", 0.05) is Limit.CLIENT_RATE  # half a token
    assert limits.admit("a", 0.1) is None  # a refused attempt took none: one is back after 0.1 s
    assert limits.admit("a", 0.1) is Limit.CLIENT_RATE
    assert limits.admit("b", 0.1) is None
    assert [limits.admit("a", 10.0) for _ in range(4)] == [None, None, None, Limit.CLIENT_RATE]  # burst, no more


def test_an_idle_client_is_forgotten_once_its_bucket_is_full() -> None:
    limits = ClientLimits(spec(client_rate="10/s", client_burst=2))
    limits.admit("a", 0.0)
    limits.release("a", 0.01)
    assert len(limits) == 1  # its bucket is not full yet: forgetting it would give it a fresh one
    limits.admit("b", 0.0)
    limits.release("b", 1.0)
    assert len(limits) == 1


def test_idle_clients_are_swept_when_many(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "SWEEP_FROM", 8)
    limits = ClientLimits(spec(client_rate="1/s", client_burst=1))
    limits._sweep_at = 8
    for i in range(8):
        limits.admit(f"c{i}", 0.0)
        limits.release(f"c{i}", 0.0)  # bucket empty: kept
    assert len(limits) == 8
    limits.admit("new", 5.0)  # the ninth: the refilled idle ones go
    assert len(limits) == 1


def test_reconfigure_keeps_the_counts() -> None:
    limits = ClientLimits(spec(client_maxconn=3, client_rate=None))
    for _ in range(3):
        limits.admit("a", 0.0)
    limits.configure(spec(client_maxconn=2, client_rate=None))
    assert limits.admit("a", 0.0) is Limit.CLIENT_MAXCONN
    limits.release("a", 0.0)
    limits.release("a", 0.0)
    assert limits.admit("a", 0.0) is None


def test_answer_slots_are_bounded_per_client_and_in_all() -> None:
    limits = ClientLimits(spec())
    held = [limits.answering("a", 0.0) for _ in range(ANSWER_SLOTS_PER_CLIENT + 1)]
    assert held == [True] * ANSWER_SLOTS_PER_CLIENT + [False]
    limits.answered("a", 0.0)
    assert limits.answering("a", 0.0)
    others = sum(limits.answering(f"c{i}", 0.0) for i in range(ANSWER_SLOTS))
    assert limits.answering_total == ANSWER_SLOTS
    assert others == ANSWER_SLOTS - ANSWER_SLOTS_PER_CLIENT
    for _ in range(ANSWER_SLOTS_PER_CLIENT):
        limits.answered("a", 1.0)
    assert limits.active("a") == 0


def test_retry_after() -> None:
    assert retry_after(spec(client_rate="100/s")) == 1
    assert retry_after(spec(client_rate="6/m")) == 10
    assert retry_after(spec(client_rate=None)) == 1


events = st.lists(
    st.tuples(
        st.sampled_from(["admit", "release"]),
        st.sampled_from(["a", "b", "c"]),
        st.floats(min_value=0.0, max_value=0.5, allow_nan=False),
    ),
    max_size=200,
)


@settings(max_examples=200)
@given(
    events,
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=1, max_value=20),
    st.integers(min_value=1, max_value=20),
)
def test_property_bounds_hold_and_clients_are_independent(
    steps: list[tuple[str, str, float]], maxconn: int, rate: int, burst: int
) -> None:
    """Whatever the order: no client holds more than client_maxconn, none is admitted more than
    burst + rate x elapsed times, one client's traffic never changes another's decisions, and once all
    is released and the buckets refilled nothing is kept."""
    s = spec(client_maxconn=maxconn, client_rate=f"{rate}/s", client_burst=burst)
    limits = ClientLimits(s)
    alone = ClientLimits(s)  # sees client "a" only
    held: dict[str, int] = {"a": 0, "b": 0, "c": 0}
    admitted: dict[str, int] = {"a": 0, "b": 0, "c": 0}
    now = 0.0
    for action, key, step in steps:
        now += step
        if action == "admit":
            verdict = limits.admit(key, now)
            if key == "a":
                assert alone.admit(key, now) == verdict
            if verdict is None:
                held[key] += 1
                admitted[key] += 1
        elif held[key]:
            held[key] -= 1
            limits.release(key, now)
            if key == "a":
                alone.release(key, now)
        assert all(limits.active(k) == n <= maxconn for k, n in held.items())
        assert all(n <= burst + rate * now + 1e-6 for n in admitted.values())
    later = now + burst / rate + 1
    for key, n in held.items():
        for _ in range(n):
            limits.release(key, later)
    limits._sweep(later)
    assert len(limits) == 0


@settings(max_examples=100)
@given(st.lists(st.floats(min_value=0.0, max_value=0.2, allow_nan=False), min_size=1, max_size=300))
def test_property_a_client_at_the_rate_is_never_refused(gaps: list[float]) -> None:
    """A client that opens no faster than client_rate (and never holds client_maxconn) is always let in."""
    limits = ClientLimits(spec(client_maxconn=1, client_rate="10/s", client_burst=1))
    now = 0.0
    for gap in gaps:
        now += 0.1 + gap
        assert limits.admit("a", now) is None
        limits.release("a", now)


# --- associations (mode dicom) ------------------------------------------------------------------------


def test_associations_per_calling_ae_title() -> None:
    limits = ClientLimits(spec(calling_ae_maxconn=2))
    assert limits.admit_association("10.0.0.1", "CT1", 0.0) is None
    assert limits.admit_association("10.0.0.2", "CT1", 0.0) is None  # the title counts from any address
    assert limits.admit_association("10.0.0.3", "CT1", 0.0) is Limit.CALLING_AE_MAXCONN
    assert limits.admit_association("10.0.0.3", "MR1", 0.0) is None
    limits.release_association("10.0.0.1", "CT1", 1.0)
    assert limits.associations("CT1") == 1
    assert limits.admit_association("10.0.0.3", "CT1", 1.0) is None
    for key, ae in [("10.0.0.2", "CT1"), ("10.0.0.3", "CT1"), ("10.0.0.3", "MR1")]:
        limits.release_association(key, ae, 2.0)
    assert limits.associations("CT1") == limits.associations("MR1") == 0
    assert not limits._by_ae


def test_ae_titles_per_client_count_until_their_window_is_over() -> None:
    limits = ClientLimits(spec(client_ae_titles=2, calling_ae_maxconn=None), window=60.0)
    assert limits.admit_association("x", "A", 0.0) is None
    assert limits.admit_association("x", "B", 0.0) is None
    assert limits.admit_association("x", "C", 0.0) is Limit.CLIENT_AE_TITLES
    assert limits.admit_association("x", "A", 0.0) is None  # a title it has is no new one
    assert limits.admit_association("y", "C", 0.0) is None  # another client
    for ae in ("A", "A", "B"):
        limits.release_association("x", ae, 10.0)
    assert limits.admit_association("x", "C", 69.0) is Limit.CLIENT_AE_TITLES  # A and B count until 70 s
    assert limits.admit_association("x", "C", 70.0) is None
    assert limits.titles("x") == 1


def test_ae_titles_are_not_counted_without_a_window() -> None:
    limits = ClientLimits(spec(client_ae_titles=1, calling_ae_maxconn=None))
    assert all(limits.admit_association("x", f"AE{i}", 0.0) is None for i in range(10))
    assert limits.titles("x") == 0


def test_ae_titles_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "SWEEP_FROM", 4)
    limits = ClientLimits(spec(client_ae_titles=None, calling_ae_maxconn=None), window=60.0, max_titles=10)
    for i in range(100):
        limits.admit_association("x", f"AE{i}", float(i))
        limits.release_association("x", f"AE{i}", float(i))
    assert limits.title_count <= 10
    assert limits.titles("x") == limits.title_count


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from(["x", "y"]),
            st.sampled_from(["A", "B", "C", "D"]),
            st.floats(min_value=0.0, max_value=30.0, allow_nan=False),
        ),
        max_size=120,
    ),
    st.integers(min_value=1, max_value=3),
    st.integers(min_value=1, max_value=3),
)
def test_property_association_bounds(steps: list[tuple[bool, str, str, float]], per_ae: int, titles: int) -> None:
    """No AE title has more than calling_ae_maxconn associations, no client more than client_ae_titles
    titles with an association open, and the counters end at zero."""
    limits = ClientLimits(spec(calling_ae_maxconn=per_ae, client_ae_titles=titles), window=60.0)
    open_: list[tuple[str, str]] = []
    now = 0.0
    for admit, key, ae, step in steps:
        now += step
        if admit:
            if limits.admit_association(key, ae, now) is None:
                open_.append((key, ae))
        elif (key, ae) in open_:
            open_.remove((key, ae))
            limits.release_association(key, ae, now)
        for name in "ABCD":
            assert limits.associations(name) == sum(1 for _, a in open_ if a == name) <= per_ae
        for client in "xy":
            assert len({a for k, a in open_ if k == client}) <= limits.titles(client) <= titles
    for key, ae in open_:
        limits.release_association(key, ae, now)
    assert not limits._by_ae


# --- the log of refusals -----------------------------------------------------------------------------------


def test_refusals_first_at_once_then_counted() -> None:
    log = RefusalLog(interval=5.0)
    assert log.note("a", Limit.CLIENT_RATE, 0.0)
    assert not log.note("a", Limit.CLIENT_RATE, 0.1)
    assert not log.note("a", Limit.CLIENT_RATE, 0.2)
    assert log.note("a", Limit.CLIENT_MAXCONN, 0.2)  # another limit: its own first line
    assert log.note("b", Limit.CLIENT_RATE, 0.3)
    assert log.next_due(1.0) == pytest.approx(4.0)
    assert log.due(1.0) == []
    assert log.due(5.0) == [("a", Limit.CLIENT_RATE, 2)]
    assert not log.pending
    assert not log.note("a", Limit.CLIENT_RATE, 6.0)  # within 5 s of the count's line
    assert log.due(10.0) == [("a", Limit.CLIENT_RATE, 1)]
    assert log.note("a", Limit.CLIENT_RATE, 20.0)  # quiet since: at once again


def test_many_clients_are_summed_beyond_a_few() -> None:
    log = RefusalLog(interval=1.0, clients=2)
    for i in range(5):
        log.note(f"c{i}", Limit.CLIENT_RATE, 0.0)
        for _ in range(i + 1):
            log.note(f"c{i}", Limit.CLIENT_RATE, 0.5)
    lines = log.due(1.0)
    assert lines == [("c4", Limit.CLIENT_RATE, 5), ("c3", Limit.CLIENT_RATE, 4), ("others", Limit.CLIENT_RATE, 6)]


@settings(max_examples=100)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.floats(min_value=0.0, max_value=3.0, allow_nan=False)),
        max_size=200,
    )
)
def test_property_every_refusal_is_counted_once_and_lines_are_rate_limited(
    refusals: list[tuple[str, float]],
) -> None:
    log = RefusalLog(interval=5.0)
    logged: dict[str, int] = {"a": 0, "b": 0}
    lines: dict[str, list[float]] = {"a": [], "b": []}
    now = 0.0
    for client, step in refusals:
        now += step
        for who, _, count in log.due(now):
            logged[who] += count
            lines[who].append(now)
        if log.note(client, Limit.CLIENT_RATE, now):
            logged[client] += 1
            lines[client].append(now)
    for who, _, count in log.due(now + 6.0):
        logged[who] += count
    assert logged == {k: sum(1 for c, _ in refusals if c == k) for k in ("a", "b")}
    for times in lines.values():
        assert all(b - a >= 5.0 - 1e-9 for a, b in itertools.pairwise(times))
