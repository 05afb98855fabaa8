"""The messages between the main process and its web workers: one class per kind.

Each message is pickled into one SOCK_SEQPACKET packet; a connection's socket travels with its
:class:`Conn` (SCM_RIGHTS). Both ends are the same installed pacslb, so the classes are the format.
The theory of operation is in webpool.py beside this module.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pacslb.balance.server import AdminState, Health, ServerState
    from pacslb.config.model import Config


@dataclass(frozen=True, slots=True)
class NodeState:
    """What a worker needs of one node's state (all the main process's health checks and admin decide)."""

    name: str
    health: Health
    admin: AdminState
    weight: int
    down_elsewhere: str | None

    @classmethod
    def of(cls, server: ServerState) -> NodeState:
        return cls(server.name, server.health, server.admin, server.weight, server.down_elsewhere)


# -- main -> worker ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Configure:
    """The services to serve: at start and on every reload."""

    config: Config


@dataclass(frozen=True, slots=True)
class State:
    """The nodes' state of the services where it changed (by service)."""

    services: dict[str, list[NodeState]]


@dataclass(frozen=True, slots=True)
class Conn:
    """Serve this connection (its socket comes with the message): ``node`` is the client's entry in the
    main process's table, held there for the connection (``fresh``: the scheduler chose it just now)."""

    conn_id: int
    service: str
    peer: tuple[str, int]
    node: str | None
    fresh: bool


@dataclass(frozen=True, slots=True)
class Abort:
    """The shutdown grace is over for this connection: close it."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class Cut:
    """A halt's grace is over: cut the exchanges with ``node`` in ``service``."""

    service: str
    node: str


@dataclass(frozen=True, slots=True)
class Stop:
    """The service stops: no new requests; close what idles."""

    service: str


# -- worker -> main ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ended:
    """The connection closed."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class Bind:
    """A request moved the client to another node (None: its entry is to be forgotten)."""

    conn_id: int
    node: str | None


@dataclass(frozen=True, slots=True)
class Counts:
    """What the worker's requests added to the counters since its last report: by service, by node,
    (connections open, requests, bytes up, bytes down); and its refusals by service and reason."""

    nodes: dict[str, dict[str, tuple[int, int, int, int]]]
    rejections: dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class CutDone:
    """How many exchanges a :class:`Cut` cut in this worker."""

    service: str
    node: str
    cut: int


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """Connecting to ``node`` failed: the main process checks it now."""

    service: str
    node: str


ToWorker = Configure | State | Conn | Abort | Cut | Stop
ToMain = Ended | Bind | Counts | CutDone | ConnectFailed
_TO_WORKER = (Configure, State, Conn, Abort, Cut, Stop)
_TO_MAIN = (Ended, Bind, Counts, CutDone, ConnectFailed)


class BadMessage(ValueError):
    """A packet that is none of the messages expected."""


def encode(message: ToWorker | ToMain) -> bytes:
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


def decode_to_worker(data: bytes) -> ToWorker:
    message = pickle.loads(data)
    if not isinstance(message, _TO_WORKER):
        raise BadMessage(f"not a message to a worker: {type(message).__name__}")
    return message


def decode_to_main(data: bytes) -> ToMain:
    message = pickle.loads(data)
    if not isinstance(message, _TO_MAIN):
        raise BadMessage(f"not a message to the main process: {type(message).__name__}")
    return message
