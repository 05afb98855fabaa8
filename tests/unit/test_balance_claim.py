"""Unit and property tests for a connection's hold on a node (pacslb/balance/claim.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pacslb.balance.claim import Claim, Claims
from pacslb.balance.persistence import PersistenceTable
from pacslb.balance.server import ServerState


class _Conn:
    """A connection a halt may cut: cutting it ends it, which releases its claim (as in every mode)."""

    def __init__(self) -> None:
        self.claim: Claim | None = None
        self.cut = 0

    def cut_short(self) -> None:
        self.cut += 1
        assert self.claim is not None
        self.claim.release(10.0)


def test_a_claim_counts_while_connecting_and_once_given_back() -> None:
    server = ServerState("n1", "127.0.0.1", 1)
    claims = Claims()
    claim = claims.take(server)
    assert (server.active, server.total) == (1, 0)  # chosen, still connecting
    assert claim.release(1.0) is True
    assert claim.release(1.0) is False  # twice is harmless
    assert (server.active, server.total, len(claims.by_server.get(server, ()))) == (0, 0, 0)


def test_a_bound_claim_holds_the_entry_and_adds_its_bytes() -> None:
    server = ServerState("n1", "127.0.0.1", 1)
    table = PersistenceTable(timeout=60.0, max_entries=10)
    claims = Claims()
    claim = claims.take(server)
    claim.bind(table, "10.0.0.5", 1.0, None)
    entry = table.peek("10.0.0.5")
    assert entry is not None and entry.server == "n1" and entry.active == 1
    assert (server.active, server.total) == (1, 1)
    claim.release(2.0, 100, 2000)
    claim.release(3.0, 100, 2000)
    assert entry.active == 0 and entry.released_at == 2.0  # the first release only
    assert (server.active, server.bytes_up, server.bytes_down) == (0, 100, 2000)


def test_without_a_key_no_entry_is_made() -> None:
    server = ServerState("n1", "127.0.0.1", 1)
    table = PersistenceTable(timeout=60.0, max_entries=10)
    claim = Claims().take(server)
    claim.bind(table, None, 1.0, None)
    claim.release(2.0)
    assert len(table) == 0 and server.total == 1 and server.active == 0


def test_a_halt_cuts_the_bound_claims_of_its_node_only() -> None:
    n1, n2 = ServerState("n1", "127.0.0.1", 1), ServerState("n2", "127.0.0.1", 2)
    claims = Claims()
    conns = []
    for server in (n1, n1, n2):
        conn = _Conn()
        conn.claim = claims.take(server)
        conn.claim.bind(None, None, 1.0, conn)
        conns.append(conn)
    connecting = claims.take(n1)  # not bound: not connected yet, nothing to cut
    assert claims.cut(n1) == 2
    assert [c.cut for c in conns] == [1, 1, 0]
    assert n1.active == 1 and n2.active == 1  # the one still connecting, and n2's
    assert claims.cut(n1) == 0
    connecting.release(11.0)
    assert n1.active == 0 and len(claims.by_server.get(n2, ())) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["bind", "release", "cut"]), st.integers(0, 5)), max_size=60))
def test_counts_always_match_the_claims_held(steps: list[tuple[str, int]]) -> None:
    """Whatever the order of binds, releases (repeated) and halts, a node's count is the claims it holds,
    and its persistence entry counts the bound ones."""
    server = ServerState("n1", "127.0.0.1", 1)
    table = PersistenceTable(timeout=60.0, max_entries=10)
    claims = Claims()
    held = [claims.take(server) for _ in range(6)]
    conns = []
    for claim in held:
        conn = _Conn()
        conn.claim = claim
        conns.append(conn)
    for step, index in steps:
        claim = held[index]
        if step == "bind" and claim.held and claim.cut is None:
            claim.bind(table, "k", 1.0, conns[index])
        elif step == "release":
            claim.release(2.0)
        elif step == "cut":
            claims.cut(server)
    assert server.active == sum(c.held for c in held)
    bound = sum(c.held and c.cut is not None for c in held)
    entry = table.peek("k")
    assert (entry.active if entry is not None else 0) == bound
    assert len(claims.by_server.get(server, ())) <= bound


def test_a_node_without_claims_is_forgotten_when_pruned() -> None:
    """A released claim leaves its node's (empty) set for the next; a reload prunes it, so that a node taken
    out of the service is not kept by the registry, and a node still held stays."""
    n1, n2 = ServerState("n1", "127.0.0.1", 1), ServerState("n2", "127.0.0.1", 2)
    claims = Claims()
    gone = claims.take(n1)
    gone.bind(None, None, 1.0, _Conn())
    held = claims.take(n2)
    held.bind(None, None, 1.0, _Conn())
    gone.release(2.0)
    assert claims.by_server[n1] == set()
    claims.prune()
    assert n1 not in claims.by_server
    assert claims.by_server[n2] == {held}
    assert claims.cut(n1) == 0
