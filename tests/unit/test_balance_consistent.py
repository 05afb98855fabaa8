"""Unit and property tests for weighted rendezvous hashing (pacslb/balance/consistent.py)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pacslb.balance.consistent import Consistent
from pacslb.balance.scheduler import make_scheduler
from pacslb.balance.server import ServerState


def servers(**weights: int) -> list[ServerState]:
    return [ServerState(name, f"10.0.0.{i + 1}", 104, weight=w) for i, (name, w) in enumerate(weights.items())]


def pick(scheduler: Consistent, candidates: list[ServerState], key: str) -> str:
    picked = scheduler.pick(candidates, key)
    assert picked is not None
    return picked.name


KEYS = [f"10.1.{i // 250}.{i % 250}" for i in range(6000)]


def test_two_balancers_agree_with_no_shared_state() -> None:
    """Two schedulers (two processes, two machines) choose alike, whatever each chose before."""
    one, two = Consistent(), Consistent()
    nodes = servers(pacs1=1, pacs2=1, pacs3=1)
    for key in KEYS[:50]:
        pick(two, nodes, key + "warm")  # a different history
    assert [pick(one, nodes, k) for k in KEYS] == [pick(two, list(reversed(nodes)), k) for k in KEYS]


def test_the_same_choice_as_in_any_other_process() -> None:
    """Golden values: the hash is not Python's salted one (these hold for every run and machine)."""
    nodes = servers(pacs1=1, pacs2=1, pacs3=1)
    keys = ("10.0.0.5", "CT01", "192.168.7.20", "10.0.0.6", "MR02")
    assert [pick(Consistent(), nodes, k) for k in keys] == ["pacs3", "pacs3", "pacs1", "pacs2", "pacs2"]


def test_weights_share_the_clients() -> None:
    counts = Counter(pick(Consistent(), servers(a=1, b=2, c=1), k) for k in KEYS)
    share = {name: counts[name] / len(KEYS) for name in "abc"}
    assert abs(share["b"] - 0.5) < 0.04 and abs(share["a"] - 0.25) < 0.04 and abs(share["c"] - 0.25) < 0.04


def test_a_node_leaving_moves_only_its_own_clients_and_they_come_back() -> None:
    scheduler = Consistent()
    nodes = servers(pacs1=1, pacs2=1, pacs3=1)
    before = {k: pick(scheduler, nodes, k) for k in KEYS}
    without = {k: pick(scheduler, [n for n in nodes if n.name != "pacs2"], k) for k in KEYS}
    moved = [k for k in KEYS if before[k] != without[k]]
    assert moved and all(before[k] == "pacs2" for k in moved)
    assert {k: pick(scheduler, nodes, k) for k in KEYS} == before


def test_weight_zero_is_never_chosen_and_no_candidate_is_none() -> None:
    scheduler = Consistent()
    assert {pick(scheduler, servers(a=0, b=1), k) for k in KEYS[:200]} == {"b"}
    assert scheduler.pick([], "x") is None
    assert scheduler.pick(servers(a=0), "x") is None


def test_without_a_key_it_is_round_robin() -> None:
    scheduler = make_scheduler("consistent")
    nodes = servers(a=1, b=1)
    assert [p.name for p in (scheduler.pick(nodes) for _ in range(4)) if p is not None] == ["a", "b", "a", "b"]


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=40), st.permutations(["n1", "n2", "n3", "n4"]))
def test_the_order_of_the_nodes_does_not_matter(key: str, order: list[str]) -> None:
    nodes = {n.name: n for n in servers(n1=1, n2=3, n3=2, n4=1)}
    assert pick(Consistent(), [nodes[n] for n in order], key) == pick(Consistent(), list(nodes.values()), key)
