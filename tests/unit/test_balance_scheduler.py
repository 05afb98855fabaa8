"""Unit tests for the scheduler table (pacslb/balance/scheduler.py) and the server view the decision code
reads (pacslb/balance/server.py)."""

from __future__ import annotations

import pytest

from pacslb.balance.consistent import Consistent
from pacslb.balance.leastconn import LeastConnections
from pacslb.balance.roundrobin import RoundRobin
from pacslb.balance.scheduler import make_scheduler
from pacslb.balance.server import ServerState

# --- make_scheduler ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"), [("roundrobin", RoundRobin), ("leastconn", LeastConnections), ("consistent", Consistent)]
)
def test_make_scheduler_by_config_name(name: str, kind: type) -> None:
    scheduler = make_scheduler(name)
    assert isinstance(scheduler, kind)
    assert scheduler.name == name


@pytest.mark.parametrize("name", ["roundrobin", "leastconn"])
def test_make_scheduler_returns_a_fresh_instance(name: str) -> None:
    pool = [ServerState("a", "10.0.0.1", 104), ServerState("b", "10.0.0.2", 104)]
    first = make_scheduler(name)
    opening = first.pick(pool)
    assert first.pick(pool) is not opening  # both algorithms move on to the other idle server
    second = make_scheduler(name)
    assert second is not first
    assert second.pick(pool) is opening  # a new scheduler starts from the beginning


@pytest.mark.parametrize("name", ["", "random", "RoundRobin", "least_conn", "source"])
def test_make_scheduler_unknown_name(name: str) -> None:
    with pytest.raises(ValueError, match="unknown balance algorithm"):
        make_scheduler(name)


def test_every_config_balance_value_has_a_scheduler() -> None:
    from typing import get_args

    from pacslb.config.model import ServiceSpec

    values = get_args(ServiceSpec.model_fields["balance"].annotation)
    assert set(values) == {"leastconn", "roundrobin", "consistent"}
    for value in values:
        assert make_scheduler(value).name == value


# --- ServerState ---------------------------------------------------------------------------------------


def test_server_state_defaults() -> None:
    s = ServerState("pacs1", "10.0.0.11", 104)
    assert (s.weight, s.health, s.admin, s.active, s.total) == (1, "up", "online", 0, 0)
    assert s.schedulable
    assert s.honours_persistence


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [("10.0.0.11", 104, "10.0.0.11:104"), ("fd00::11", 104, "[fd00::11]:104"), ("::1", 80, "[::1]:80")],
)
def test_server_address(host: str, port: int, address: str) -> None:
    assert ServerState("p", host, port).address == address


@pytest.mark.parametrize(
    ("health", "admin", "weight", "schedulable", "honours"),
    [
        ("up", "online", 1, True, True),
        ("up", "online", 256, True, True),
        ("up", "online", 0, False, True),  # weight 0 keeps its persistent clients
        ("up", "drain", 1, False, True),  # drain: only clients already pinned to it
        ("up", "drain", 0, False, True),
        ("up", "halt", 1, False, False),  # halt: nothing
        ("down", "online", 1, False, False),
        ("down", "drain", 1, False, False),
        ("down", "halt", 1, False, False),
        ("down", "online", 0, False, False),
    ],
)
def test_schedulable_and_honours_persistence(
    health: str, admin: str, weight: int, schedulable: bool, honours: bool
) -> None:
    s = ServerState("p", "10.0.0.1", 104, weight=weight, health=health, admin=admin)  # type: ignore[arg-type]
    assert s.schedulable is schedulable
    assert s.honours_persistence is honours


def test_server_states_compare_by_identity() -> None:
    """Two members with the same fields are still two servers (decision.py's ``exclude`` relies on it)."""
    a = ServerState("pacs1", "10.0.0.11", 104)
    b = ServerState("pacs1", "10.0.0.11", 104)
    assert a != b
    assert a == a
    assert a in [a] and b not in [a]
