"""Unit and property tests for persistence keys and the persistence table (pacslb/balance/persistence.py)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacslb.balance.persistence import Entry, PersistenceTable, source_ip_key

# --- source_ip_key -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "prefix4", "prefix6", "key"),
    [
        ("10.0.0.5", 32, 128, "10.0.0.5"),
        ("10.0.0.5", 24, 128, "10.0.0.0"),
        ("10.1.2.3", 16, 128, "10.1.0.0"),
        ("10.1.2.3", 8, 128, "10.0.0.0"),
        ("10.1.2.3", 0, 128, "0.0.0.0"),
        ("192.168.7.200", 25, 128, "192.168.7.128"),
        # IPv4-mapped IPv6 (dual-stack listeners) counts as IPv4, with the IPv4 netmask
        ("::ffff:10.0.0.5", 32, 128, "10.0.0.5"),
        ("::ffff:10.0.0.5", 24, 128, "10.0.0.0"),
        ("::ffff:10.0.0.5", 24, 0, "10.0.0.0"),
        ("::FFFF:0a00:0005", 32, 128, "10.0.0.5"),
        # IPv6
        ("fd00::11", 32, 128, "fd00::11"),
        ("FD00:0:0:0::11", 32, 128, "fd00::11"),
        ("fd00:1:2:3:4:5:6:7", 32, 64, "fd00:1:2:3::"),
        ("fd00:1:2:3:4:5:6:7", 32, 48, "fd00:1:2::"),
        ("fd00:1:2:3:4:5:6:7", 32, 0, "::"),
        ("fe80::1%eth0", 32, 128, "fe80::1"),  # the zone of a link-local address is not part of the client
        ("fe80::1:2%eth0", 32, 64, "fe80::"),
    ],
)
def test_source_ip_key(address: str, prefix4: int, prefix6: int, key: str) -> None:
    assert source_ip_key(address, prefix4, prefix6) == key


def test_source_ip_key_defaults_to_full_addresses() -> None:
    assert source_ip_key("10.0.0.5") == "10.0.0.5"
    assert source_ip_key("fd00::5") == "fd00::5"


def test_mapped_and_plain_ipv4_share_a_key() -> None:
    assert source_ip_key("::ffff:10.0.0.5") == source_ip_key("10.0.0.5")
    assert source_ip_key("::ffff:10.0.0.5", 24) == source_ip_key("10.0.0.77", 24)


def test_ipv6_netmask_does_not_apply_to_ipv4_and_back() -> None:
    assert source_ip_key("10.0.0.5", 32, 0) == "10.0.0.5"
    assert source_ip_key("fd00::5", 0, 128) == "fd00::5"


@pytest.mark.parametrize("address", ["", "pacs1", "10.0.0.256", "10.0.0", "fd00:::1", "10.0.0.1:104"])
def test_source_ip_key_refuses_what_is_not_an_address(address: str) -> None:
    with pytest.raises(ValueError):
        source_ip_key(address)


@settings(max_examples=50)
@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
def test_ipv4_key_is_the_network_of_the_address(ip: ipaddress.IPv4Address, prefix: int) -> None:
    key = source_ip_key(str(ip), prefix)
    network = ipaddress.IPv4Network((key, prefix))  # strict: raises unless key is a network address
    assert ip in network
    assert source_ip_key(f"::ffff:{ip}", prefix) == key


@settings(max_examples=50)
@given(st.ip_addresses(v=6), st.integers(min_value=0, max_value=128))
def test_ipv6_key_is_the_network_of_the_address(ip: ipaddress.IPv6Address, prefix: int) -> None:
    key = source_ip_key(str(ip), 32, prefix)
    if ip.ipv4_mapped is not None:
        assert key == str(ip.ipv4_mapped)
        return
    network = ipaddress.IPv6Network((key, prefix))
    assert ip in network


@settings(max_examples=50)
@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
def test_ipv4_same_network_same_key(a: ipaddress.IPv4Address, b: ipaddress.IPv4Address, prefix: int) -> None:
    same = ipaddress.IPv4Network((a, prefix), strict=False) == ipaddress.IPv4Network((b, prefix), strict=False)
    assert (source_ip_key(str(a), prefix) == source_ip_key(str(b), prefix)) is same


# --- PersistenceTable: binding and expiry --------------------------------------------------------------

TIMEOUT = 1800.0


@pytest.fixture
def table() -> PersistenceTable:
    return PersistenceTable(timeout=TIMEOUT, max_entries=100)


def entry(table: PersistenceTable, key: str) -> Entry:
    found = dict(table.items())
    assert key in found, f"{key} not in table"
    return found[key]


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PersistenceTable(timeout=1.0, max_entries=0)
    assert PersistenceTable(timeout=1.0, max_entries=1).max_entries == 1


def test_unknown_key(table: PersistenceTable) -> None:
    assert table.lookup("10.0.0.5", 0.0) is None
    assert len(table) == 0


def test_acquire_binds(table: PersistenceTable) -> None:
    table.acquire("10.0.0.5", "pacs1", 0.0)
    assert table.lookup("10.0.0.5", 1.0) == "pacs1"
    assert table.lookup("10.0.0.6", 1.0) is None
    assert entry(table, "10.0.0.5") == Entry("pacs1", active=1, released_at=None)
    assert len(table) == 1


def test_expiry_counts_from_the_release_of_the_last_connection(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    table.release("c", "pacs1", 5000.0)  # a study far longer than the timeout
    assert table.lookup("c", 5000.0 + TIMEOUT - 0.001) == "pacs1"
    assert table.lookup("c", 5000.0 + TIMEOUT) is None
    assert len(table) == 0  # an expired entry found by lookup is removed


def test_never_expires_while_a_connection_is_open(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    for now in (TIMEOUT, 10 * TIMEOUT, 1e12):
        assert table.lookup("c", now) == "pacs1"
        assert table.expire(now) == 0
    assert len(table) == 1


def test_expiry_waits_for_every_connection(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    table.acquire("c", "pacs1", 10.0)
    table.release("c", "pacs1", 20.0)
    assert entry(table, "c").active == 1
    assert table.lookup("c", 20.0 + 2 * TIMEOUT) == "pacs1"  # one still open
    table.release("c", "pacs1", 100_000.0)
    assert entry(table, "c") == Entry("pacs1", active=0, released_at=100_000.0)
    assert table.lookup("c", 100_000.0 + TIMEOUT - 1) == "pacs1"
    assert table.lookup("c", 100_000.0 + TIMEOUT) is None


def test_a_new_connection_stops_the_countdown(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    table.release("c", "pacs1", 10.0)
    table.acquire("c", "pacs1", 10.0 + TIMEOUT - 1)
    assert entry(table, "c") == Entry("pacs1", active=1, released_at=None)
    assert table.lookup("c", 10.0 + 5 * TIMEOUT) == "pacs1"
    table.release("c", "pacs1", 10.0 + 5 * TIMEOUT)
    assert table.lookup("c", 10.0 + 6 * TIMEOUT - 1) == "pacs1"


def test_acquire_after_expiry_starts_a_fresh_entry(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    table.release("c", "pacs1", 1.0)
    table.acquire("c", "pacs2", 1.0 + TIMEOUT)
    assert entry(table, "c") == Entry("pacs2", active=1, released_at=None)


def test_rebinding_moves_the_key(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    table.acquire("c", "pacs1", 0.0)
    table.acquire("c", "pacs2", 1.0)  # e.g. pacs1 went down and the client was re-balanced
    assert table.lookup("c", 2.0) == "pacs2"
    assert entry(table, "c") == Entry("pacs2", active=1, released_at=None)
    assert len(table) == 1


def test_release_for_a_server_the_key_was_moved_away_from_is_ignored(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    table.acquire("c", "pacs2", 1.0)
    table.release("c", "pacs1", 2.0)  # the old connection to pacs1 ends
    assert entry(table, "c") == Entry("pacs2", active=1, released_at=None)
    assert table.lookup("c", 2.0 + 10 * TIMEOUT) == "pacs2"
    table.release("c", "pacs2", 3.0)
    assert entry(table, "c") == Entry("pacs2", active=0, released_at=3.0)


def test_release_of_an_unknown_key_is_ignored(table: PersistenceTable) -> None:
    table.release("nobody", "pacs1", 1.0)
    assert len(table) == 0


def test_active_never_goes_negative(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    table.release("c", "pacs1", 1.0)
    table.release("c", "pacs1", 2.0)
    assert entry(table, "c").active == 0
    table.acquire("c", "pacs1", 3.0)
    assert entry(table, "c").active == 1


def test_zero_timeout_expires_on_release() -> None:
    table = PersistenceTable(timeout=0.0, max_entries=10)
    table.acquire("c", "pacs1", 0.0)
    assert table.lookup("c", 100.0) == "pacs1"
    table.release("c", "pacs1", 100.0)
    assert table.lookup("c", 100.0) is None


def test_timeout_change_applies_to_existing_entries(table: PersistenceTable) -> None:
    table.acquire("c", "pacs1", 0.0)
    table.release("c", "pacs1", 0.0)
    table.timeout = 10.0
    assert table.lookup("c", 9.0) == "pacs1"
    assert table.lookup("c", 10.0) is None


# --- forget, drop_server, expire -----------------------------------------------------------------------


def test_forget(table: PersistenceTable) -> None:
    table.acquire("a", "pacs1", 0.0)
    table.acquire("b", "pacs1", 0.0)
    table.forget("a")
    table.forget("never-seen")
    assert table.lookup("a", 0.0) is None
    assert table.lookup("b", 0.0) == "pacs1"
    assert len(table) == 1


def test_drop_server(table: PersistenceTable) -> None:
    for i, server in enumerate(["pacs1", "pacs2", "pacs1", "pacs3", "pacs1"]):
        table.acquire(f"c{i}", server, 0.0)
    assert table.drop_server("pacs1") == 3
    assert [(k, e.server) for k, e in table.items()] == [("c1", "pacs2"), ("c3", "pacs3")]
    assert table.drop_server("pacs1") == 0
    assert table.drop_server("unknown") == 0
    assert len(table) == 2


def test_expire_removes_only_expired_entries(table: PersistenceTable) -> None:
    table.acquire("open", "pacs1", 0.0)  # still connected
    table.acquire("old", "pacs1", 0.0)
    table.release("old", "pacs1", 10.0)
    table.acquire("recent", "pacs2", 0.0)
    table.release("recent", "pacs2", 1000.0)
    assert table.expire(10.0 + TIMEOUT - 1) == 0
    assert table.expire(10.0 + TIMEOUT) == 1
    assert sorted(k for k, _ in table.items()) == ["open", "recent"]
    assert table.expire(1e12) == 1
    assert [k for k, _ in table.items()] == ["open"]


# --- bounded size: LRU eviction ------------------------------------------------------------------------


def test_least_recently_used_entry_goes_when_full() -> None:
    table = PersistenceTable(timeout=TIMEOUT, max_entries=3)
    for key in ("a", "b", "c"):
        table.acquire(key, "pacs1", 0.0)
    table.acquire("a", "pacs1", 1.0)  # "a" used again: "b" is now the least recently used
    table.acquire("d", "pacs2", 2.0)
    assert len(table) == 3
    assert [k for k, _ in table.items()] == ["c", "a", "d"]
    assert table.lookup("b", 2.0) is None
    table.acquire("e", "pacs2", 3.0)
    assert [k for k, _ in table.items()] == ["a", "d", "e"]


def test_rebinding_a_known_key_when_full_evicts_nothing() -> None:
    table = PersistenceTable(timeout=TIMEOUT, max_entries=2)
    table.acquire("a", "pacs1", 0.0)
    table.acquire("b", "pacs1", 0.0)
    table.acquire("a", "pacs2", 1.0)
    assert [(k, e.server) for k, e in table.items()] == [("b", "pacs1"), ("a", "pacs2")]


def test_table_of_one() -> None:
    table = PersistenceTable(timeout=TIMEOUT, max_entries=1)
    table.acquire("a", "pacs1", 0.0)
    table.acquire("b", "pacs2", 0.0)
    assert [k for k, _ in table.items()] == ["b"]
    table.release("a", "pacs1", 1.0)  # evicted: ignored
    assert entry(table, "b").active == 1


def test_items_is_a_snapshot(table: PersistenceTable) -> None:
    table.acquire("a", "pacs1", 0.0)
    table.acquire("b", "pacs1", 0.0)
    for key, _ in table.items():
        table.forget(key)  # must not break the iteration
    assert len(table) == 0


# --- properties ----------------------------------------------------------------------------------------

KEYS = st.sampled_from([f"10.0.0.{i}" for i in range(12)])
SERVERS = st.sampled_from(["pacs1", "pacs2", "pacs3"])
NAMES = st.sampled_from(["acquire", "acquire", "release", "release", "lookup", "forget", "drop_server", "expire"])
# (operation, key, server, seconds elapsed since the previous operation)
OPS = st.lists(st.tuples(NAMES, KEYS, SERVERS, st.sampled_from([0.0, 0.5, 1.0, 7.0, 30.0, 1000.0])), max_size=80)


def run(table: PersistenceTable, op: str, key: str, server: str, now: float) -> None:
    if op == "acquire":
        table.acquire(key, server, now)
    elif op == "release":
        table.release(key, server, now)
    elif op == "lookup":
        table.lookup(key, now)
    elif op == "forget":
        table.forget(key)
    elif op == "drop_server":
        table.drop_server(server)
    else:
        table.expire(now)


@given(OPS, st.integers(min_value=1, max_value=8), st.floats(min_value=0, max_value=100))
def test_table_never_exceeds_max_entries(
    ops: list[tuple[str, str, str, float]], max_entries: int, timeout: float
) -> None:
    table = PersistenceTable(timeout=timeout, max_entries=max_entries)
    now = 0.0
    for op, key, server, step in ops:
        now += step
        run(table, op, key, server, now)
        assert len(table) <= max_entries
        assert len(list(table.items())) == len(table)


@given(OPS, st.floats(min_value=0, max_value=100), st.floats(min_value=0, max_value=1e12))
def test_entry_with_open_connections_never_expires(
    ops: list[tuple[str, str, str, float]], timeout: float, later: float
) -> None:
    """Compared with a model of open connections: an entry holding any never expires, at any time."""
    table = PersistenceTable(timeout=timeout, max_entries=1000)  # large enough that nothing is evicted
    open_: dict[str, tuple[str, int]] = {}  # key -> (server, connections open to it)
    now = 0.0
    for op, key, server, step in ops:
        now += step
        run(table, op, key, server, now)
        if op == "acquire":
            bound, count = open_.get(key, (server, 0))
            open_[key] = (server, count + 1 if bound == server else 1)
        elif op == "release" and key in open_ and open_[key][0] == server:
            open_[key] = (server, max(0, open_[key][1] - 1))
        # forget / drop_server / expiry remove entries: the model follows the table
        present = dict(table.items())
        for k in list(open_):
            if k not in present:
                del open_[k]
        for k, (bound, count) in open_.items():
            assert present[k].server == bound
            assert present[k].active == count
    for key, (bound, count) in open_.items():
        if count > 0:
            assert table.lookup(key, now + later) == bound
    survivors = {k for k, (_, count) in open_.items() if count > 0}
    table.expire(now + later)
    assert survivors <= {k for k, _ in table.items()}


def test_adopting_the_same_binding_later_moves_an_idle_entrys_expiry_on() -> None:
    """A touch from another balancer: the client was seen there since; an open connection here is unaffected."""
    table = PersistenceTable(timeout=10.0, max_entries=10)
    table.adopt("10.0.0.5", "pacs1", released_at=0.0)
    table.adopt("10.0.0.5", "pacs1", released_at=8.0)
    assert table.lookup("10.0.0.5", 15.0) == "pacs1"  # expired at 10 without the touch
    table.adopt("10.0.0.5", "pacs1", released_at=2.0)  # an older one changes nothing
    assert table.lookup("10.0.0.5", 17.0) == "pacs1" and table.lookup("10.0.0.5", 18.5) is None
    table.acquire("10.0.0.6", "pacs2", 0.0)
    table.adopt("10.0.0.6", "pacs2", released_at=5.0)
    entry = table.peek("10.0.0.6")
    assert entry is not None and entry.active == 1 and entry.released_at is None
