"""Unit and property tests for choosing a node: persistence first, then the scheduler
(pacslb/balance/decision.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pacslb.balance.decision import Attempts, Decision, choose
from pacslb.balance.leastconn import LeastConnections
from pacslb.balance.persistence import Lease, PersistenceTable
from pacslb.balance.roundrobin import RoundRobin
from pacslb.balance.scheduler import make_scheduler
from pacslb.balance.server import ServerState

KEY = "10.0.0.5"
NOW = 100.0


def pool(*names: str) -> list[ServerState]:
    return [ServerState(n, f"10.0.0.{11 + i}", 104) for i, n in enumerate(names)]


def pinned_table(server: str) -> PersistenceTable:
    table = PersistenceTable(timeout=1800.0, max_entries=100)
    table.acquire(KEY, server, 0.0)
    return table


def test_without_persistence_the_scheduler_decides() -> None:
    servers = pool("pacs1", "pacs2")
    decision = choose(servers, RoundRobin(), None, None, NOW)
    assert decision == Decision(servers[0], "balance")
    assert choose(servers, RoundRobin(), None, KEY, NOW) == Decision(servers[0], "balance")


def test_unknown_client_is_balanced_and_not_yet_pinned() -> None:
    servers = pool("pacs1", "pacs2")
    table = PersistenceTable(timeout=1800.0, max_entries=100)
    decision = choose(servers, RoundRobin(), table, KEY, NOW)
    assert decision is not None
    assert (decision.server.name, decision.rule) == ("pacs1", "balance")
    assert len(table) == 0  # binding is the caller's job, once the connection is made


def test_persistence_comes_before_the_scheduler() -> None:
    servers = pool("pacs1", "pacs2", "pacs3")
    servers[2].active = 50  # the scheduler would never pick pacs3
    decision = choose(servers, LeastConnections(), pinned_table("pacs3"), KEY, NOW)
    assert decision == Decision(servers[2], "persistence")


def test_a_drained_node_keeps_its_pinned_clients() -> None:
    servers = pool("pacs1", "pacs2")
    servers[1].admin = "drain"
    table = pinned_table("pacs2")
    assert choose(servers, RoundRobin(), table, KEY, NOW) == Decision(servers[1], "persistence")
    assert table.lookup(KEY, NOW) == "pacs2"
    # but takes no new client
    for _ in range(5):
        assert choose(servers, RoundRobin(), table, "10.0.0.99", NOW) == Decision(servers[0], "balance")


def test_a_weight_zero_node_keeps_its_pinned_clients() -> None:
    servers = pool("pacs1", "pacs2")
    servers[1].weight = 0
    assert choose(servers, RoundRobin(), pinned_table("pacs2"), KEY, NOW) == Decision(servers[1], "persistence")


@pytest.mark.parametrize(("health", "admin"), [("up", "halt"), ("down", "online"), ("down", "drain")])
def test_a_halted_or_down_node_loses_its_clients(health: str, admin: str) -> None:
    servers = pool("pacs1", "pacs2")
    servers[1].health = health  # type: ignore[assignment]
    servers[1].admin = admin  # type: ignore[assignment]
    table = pinned_table("pacs2")
    decision = choose(servers, RoundRobin(), table, KEY, NOW)
    assert decision == Decision(servers[0], "balance")
    assert table.lookup(KEY, NOW) is None  # the entry is forgotten: the client is re-balanced
    assert len(table) == 0


def test_a_node_removed_from_the_service_loses_its_clients() -> None:
    servers = pool("pacs1", "pacs2")
    table = pinned_table("pacs9")
    assert choose(servers, RoundRobin(), table, KEY, NOW) == Decision(servers[0], "balance")
    assert table.lookup(KEY, NOW) is None


def test_an_expired_entry_is_not_followed() -> None:
    servers = pool("pacs1", "pacs2")
    table = pinned_table("pacs2")
    table.release(KEY, "pacs2", 0.0)
    assert choose(servers, RoundRobin(), table, KEY, 1799.0) == Decision(servers[1], "persistence")
    assert choose(servers, RoundRobin(), table, KEY, 1800.0) == Decision(servers[0], "balance")


def test_other_clients_entries_are_left_alone() -> None:
    servers = pool("pacs1", "pacs2")
    servers[1].admin = "halt"
    table = pinned_table("pacs2")
    table.acquire("10.0.0.6", "pacs1", 0.0)
    choose(servers, RoundRobin(), table, KEY, NOW)
    assert [(k, e.server) for k, e in table.items()] == [("10.0.0.6", "pacs1")]


def test_an_excluded_pinned_node_is_not_chosen_but_not_forgotten() -> None:
    """A connect to the pinned node failed: retry elsewhere, but keep the entry (the failure may be brief;
    the health monitor decides whether the node is down)."""
    servers = pool("pacs1", "pacs2")
    table = pinned_table("pacs2")
    decision = choose(servers, RoundRobin(), table, KEY, NOW, exclude=[servers[1]])
    assert decision == Decision(servers[0], "balance")
    assert table.lookup(KEY, NOW) == "pacs2"


def test_excluded_servers_are_never_chosen_by_the_scheduler() -> None:
    servers = pool("pacs1", "pacs2", "pacs3")
    scheduler = RoundRobin()
    chosen = [choose(servers, scheduler, None, None, NOW, exclude=[servers[0]]) for _ in range(6)]
    assert [d.server.name for d in chosen if d is not None] == ["pacs2", "pacs3"] * 3


def test_exclusion_is_by_identity_not_by_name() -> None:
    servers = pool("pacs1", "pacs2")
    lookalike = ServerState("pacs1", "10.0.0.11", 104)
    decision = choose(servers, RoundRobin(), None, None, NOW, exclude=[lookalike])
    assert decision == Decision(servers[0], "balance")


def test_nothing_left() -> None:
    servers = pool("pacs1", "pacs2")
    assert choose(servers, RoundRobin(), None, None, NOW, exclude=servers) is None
    assert choose([], RoundRobin(), None, None, NOW) is None
    servers[0].health = "down"
    servers[1].admin = "drain"
    assert choose(servers, LeastConnections(), PersistenceTable(60.0, 10), KEY, NOW) is None


def test_only_schedulable_servers_are_candidates() -> None:
    servers = pool("up", "down", "drain", "halt", "zero")
    servers[1].health = "down"
    servers[2].admin = "drain"
    servers[3].admin = "halt"
    servers[4].weight = 0
    for name in ("roundrobin", "leastconn"):
        scheduler = make_scheduler(name)
        for _ in range(10):
            decision = choose(servers, scheduler, None, None, NOW)
            assert decision == Decision(servers[0], "balance")


# --- property: the decision rules hold for any pool state ----------------------------------------------

server_state = st.tuples(
    st.sampled_from(["up", "down"]),
    st.sampled_from(["online", "drain", "halt"]),
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=0, max_value=5),
    st.booleans(),  # excluded?
)


@given(
    st.lists(server_state, min_size=0, max_size=6),
    st.integers(min_value=-1, max_value=7),  # index of the pinned server (out of range: a removed node)
    st.sampled_from(["roundrobin", "leastconn"]),
)
def test_decision_rules(specs: list[tuple[str, str, int, int, bool]], pinned: int, algorithm: str) -> None:
    servers = [
        ServerState(f"s{i}", "10.0.0.1", 104, weight=w, health=h, admin=a, active=n)  # type: ignore[arg-type]
        for i, (h, a, w, n, _) in enumerate(specs)
    ]
    exclude = [s for s, spec in zip(servers, specs, strict=True) if spec[4]]
    table = PersistenceTable(timeout=60.0, max_entries=10)
    if pinned >= 0:
        table.acquire(KEY, f"s{pinned}", 0.0)
    target = next((s for s in servers if s.name == f"s{pinned}"), None)

    decision = choose(servers, make_scheduler(algorithm), table, KEY, NOW, exclude=exclude)

    if decision is not None:
        assert any(decision.server is s for s in servers)
        assert all(decision.server is not s for s in exclude)  # excluded: never chosen
    # the rules restated from the docs, independently of ServerState's properties
    honours = {s.name: s.health == "up" and s.admin != "halt" for s in servers}
    schedulable = {s.name: s.health == "up" and s.admin == "online" and s.weight > 0 for s in servers}
    if target is not None and honours[target.name] and target not in exclude:
        assert decision == Decision(target, "persistence")
        return
    assert decision is None or decision.rule == "balance"
    candidates = [s for s in servers if schedulable[s.name] and s not in exclude]
    if candidates:
        assert decision is not None and decision.server in candidates
    else:
        assert decision is None
    if pinned >= 0:
        # an entry is forgotten exactly when its node is missing, down or halted and was not merely excluded
        kept = target is not None and target in exclude
        assert (table.lookup(KEY, NOW) is not None) is kept


# -- a web worker's lease (balance/persistence.py, Lease) -------------------------------------------------


def test_a_lease_decides_as_the_table_and_tells_the_main_process_what_moved() -> None:
    servers = pool("pacs1", "pacs2", "pacs3")
    moves: list[str | None] = []
    lease = Lease("pacs2", False, moves.append)
    assert choose(servers, RoundRobin(), lease, KEY, NOW) == Decision(servers[1], "persistence")
    lease.acquire(KEY, "pacs2", NOW)
    lease.release(KEY, "pacs2", NOW)  # the main process releases the entry, when the connection ends
    assert moves == [] and lease.lookup(KEY, NOW) == "pacs2"
    servers[1].admin = "halt"  # its node halted: re-balanced, and the move reported (forgotten, then bound)
    decision = choose(servers, RoundRobin(), lease, KEY, NOW)
    assert decision is not None and decision.rule == "balance" and decision.server is not servers[1]
    lease.acquire(KEY, decision.server.name, NOW)
    assert moves == [None, decision.server.name]
    assert choose(servers, RoundRobin(), lease, KEY, NOW) == Decision(decision.server, "persistence")


def test_a_fresh_lease_is_the_schedulers_choice_until_a_request_used_it() -> None:
    servers = pool("pacs1", "pacs2")
    moves: list[str | None] = []
    lease = Lease("pacs2", True, moves.append)  # the main process's scheduler chose pacs2 for a new client
    assert choose(servers, RoundRobin(), lease, KEY, NOW) == Decision(servers[1], "balance")
    lease.acquire(KEY, "pacs2", NOW)
    assert choose(servers, RoundRobin(), lease, KEY, NOW) == Decision(servers[1], "persistence")
    assert moves == []
    assert not Lease(None, True, moves.append).fresh  # nothing leased: nothing fresh either
    assert not PersistenceTable(timeout=1.0, max_entries=1).fresh


# --- retry on another node ------------------------------------------------------------------------------


def _attempts(
    servers: list[ServerState], retries: int, fallback: ServerState | None = None, first: Decision | None = None
) -> Attempts:
    return Attempts(lambda tried: choose(servers, RoundRobin(), None, None, NOW, tried), retries, fallback, first)


def test_attempts_try_each_node_once_within_the_retries() -> None:
    servers = pool("a", "b", "c")
    attempts = _attempts(servers, retries=5)
    seen = []
    while (decision := attempts.next()) is not None:
        seen.append(decision.server.name)
        assert attempts.failed() == len(seen)
    assert sorted(seen) == ["a", "b", "c"]  # never one that failed, and none left after the three


def test_attempts_stop_after_the_retries() -> None:
    attempts = _attempts(pool("a", "b", "c"), retries=1)
    assert attempts.next() is not None
    attempts.failed()
    assert attempts.next() is not None
    attempts.failed()
    assert attempts.next() is None  # 1 + retries nodes tried
    assert len(attempts.tried) == 2


def test_attempts_end_with_the_fallback_once() -> None:
    servers = pool("a")
    fallback = ServerState("sorry", "10.0.0.99", 80)
    attempts = _attempts(servers, retries=3, fallback=fallback)
    assert attempts.next() == Decision(servers[0], "balance")
    attempts.failed()
    assert attempts.next() == Decision(fallback, "fallback")
    attempts.failed()
    assert attempts.next() is None


def test_attempts_take_a_decision_made_already_first() -> None:
    servers = pool("a", "b")
    attempts = _attempts(servers, retries=1, first=Decision(servers[1], "cookie"))
    assert attempts.next() == Decision(servers[1], "cookie")
    attempts.failed()
    assert attempts.next() == Decision(servers[0], "balance")


def test_attempts_start_over() -> None:
    servers = pool("a")
    attempts = _attempts(servers, retries=0)
    assert attempts.next() is not None
    attempts.failed()
    assert attempts.next() is None
    attempts.again()  # a modality restarting: tried again after a pause
    assert attempts.next() == Decision(servers[0], "balance")


@given(st.integers(0, 4), st.lists(st.booleans(), min_size=1, max_size=12))
def test_attempts_never_repeat_a_failed_node_nor_exceed_the_retries(retries: int, fails: list[bool]) -> None:
    servers = pool("a", "b", "c", "d")
    attempts = _attempts(servers, retries=retries)
    given_out = 0
    for fail in fails:
        decision = attempts.next()
        if decision is None:
            break
        given_out += 1
        assert decision.server not in attempts.tried
        if not fail:
            break
        attempts.failed()
    assert given_out <= retries + 1
    assert len(set(attempts.tried)) == len(attempts.tried)
