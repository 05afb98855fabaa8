"""Unit and property tests for weighted least connections (pacslb/balance/leastconn.py)."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from pacslb.balance.leastconn import LeastConnections
from pacslb.balance.server import ServerState


def server(name: str, *, weight: int = 1, active: int = 0) -> ServerState:
    return ServerState(name, "10.0.0.1", 104, weight=weight, active=active)


def load(s: ServerState) -> Fraction:
    return Fraction(s.active + 1, s.weight)


def test_name() -> None:
    assert LeastConnections.name == "leastconn"


def test_fewest_active_wins() -> None:
    pool = [server("a", active=3), server("b", active=1), server("c", active=2)]
    assert LeastConnections().pick(pool) is pool[1]


def test_weight_scales_the_load() -> None:
    # a: (4+1)/2 = 2.5, b: (1+1)/1 = 2 -> b
    a, b = server("a", weight=2, active=4), server("b", weight=1, active=1)
    assert LeastConnections().pick([a, b]) is b
    # a: (2+1)/2 = 1.5, b: 2 -> a, although a has more connections
    a.active = 2
    assert LeastConnections().pick([a, b]) is a


def test_load_counts_the_new_connection() -> None:
    """(active + 1) / weight: an idle weight-1 node (1) and a weight-4 node with 2 open (0.75)."""
    idle, big = server("idle", weight=1, active=0), server("big", weight=4, active=2)
    assert LeastConnections().pick([idle, big]) is big


def test_no_candidates_and_weight_zero() -> None:
    lc = LeastConnections()
    assert lc.pick([]) is None
    assert lc.pick([server("a", weight=0), server("b", weight=0)]) is None
    zero, busy = server("zero", weight=0, active=0), server("busy", weight=1, active=1000)
    assert all(lc.pick([zero, busy]) is busy for _ in range(5))


def test_ties_rotate_so_an_idle_cluster_spreads() -> None:
    pool = [server("a"), server("b"), server("c")]
    lc = LeastConnections()
    first = [lc.pick(pool) for _ in range(3)]
    assert {id(s) for s in first} == {id(s) for s in pool}
    names = [p.name for p in (lc.pick(pool) for _ in range(6)) if p is not None]
    assert Counter(names) == {"a": 2, "b": 2, "c": 2}


def test_ties_with_different_weights_rotate() -> None:
    # (1+1)/2 == (0+1)/1: an exact tie between different weights
    a, b = server("a", weight=2, active=1), server("b", weight=1, active=0)
    lc = LeastConnections()
    assert {lc.pick([a, b]).name for _ in range(2)} == {"a", "b"}  # type: ignore[union-attr]


def test_rotation_skips_servers_not_tied() -> None:
    pool = [server("a"), server("busy", active=5), server("c")]
    lc = LeastConnections()
    assert {lc.pick(pool).name for _ in range(10)} == {"a", "c"}  # type: ignore[union-attr]


def test_connections_spread_in_proportion_to_weight() -> None:
    pool = [server("a", weight=1), server("b", weight=2), server("c", weight=3)]
    lc = LeastConnections()
    for _ in range(60):
        picked = lc.pick(pool)
        assert picked is not None
        picked.active += 1
    assert [s.active for s in pool] == [10, 20, 30]


def test_a_freed_server_is_preferred() -> None:
    pool = [server("a", active=5), server("b", active=5)]
    lc = LeastConnections()
    pool[1].active = 0
    assert all(lc.pick(pool) is pool[1] for _ in range(3))


servers_strategy = st.lists(
    st.tuples(st.integers(min_value=0, max_value=256), st.integers(min_value=0, max_value=10**6)),
    min_size=1,
    max_size=10,
)


@given(servers_strategy, st.integers(min_value=0, max_value=20))
def test_never_picks_a_strictly_more_loaded_server(spec: list[tuple[int, int]], earlier: int) -> None:
    pool = [server(f"s{i}", weight=w, active=a) for i, (w, a) in enumerate(spec)]
    lc = LeastConnections()
    for _ in range(earlier):  # whatever the tie-break state
        lc.pick(pool)
    picked = lc.pick(pool)
    usable = [s for s in pool if s.weight > 0]
    if not usable:
        assert picked is None
        return
    assert picked is not None
    assert any(picked is s for s in usable)
    assert all(load(picked) <= load(other) for other in usable)


@given(st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=6))
def test_simulated_connections_stay_balanced(weights: list[int]) -> None:
    """Opening connections one by one always picks a least-loaded node, and after 3 * sum(weights)
    connections every node holds exactly 3 * its weight (whatever the tie-breaks)."""
    pool = [server(f"s{i}", weight=w) for i, w in enumerate(weights)]
    lc = LeastConnections()
    for _ in range(3 * sum(weights)):
        picked = lc.pick(pool)
        assert picked is not None
        assert all(load(picked) <= load(s) for s in pool)
        picked.active += 1
    assert [s.active for s in pool] == [3 * w for w in weights]
