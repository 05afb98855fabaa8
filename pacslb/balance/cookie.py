"""The persistence cookie's value: which node it names, without saying where that node is.

Theory of operation. The value for a node is an HMAC-SHA256 of the service and node names, keyed by the
service's ``http.cookie.secret``, truncated to 96 bits and written in base64url (16 characters). So:
- it reveals neither the node's address nor, with a secret, its name (a value cannot be turned back into
  a name without the key, and cannot be forged for a chosen node);
- it is the same on every balancer that has the same config (a clustered pair hands over clients without
  re-balancing them) and across restarts;
- it changes when the secret changes (every client is re-balanced once) and differs per service, so a
  cookie of one service means nothing to another.
Without a secret the key is a fixed string: values are still opaque and stable, but someone who knows the
node names can compute them, which only lets a client pick its own node, as HAProxy's plain server-name
cookies always do.

:func:`choose_with_cookie` is the decision of one HTTP request. Decoding is a dictionary lookup in a
table built once per config: a value that names no node of the service (a node removed, a secret
changed, a client's invention) is simply unknown, and the client is re-balanced and given a fresh cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Collection, Iterable, Sequence
from typing import Literal

from pacslb.balance.decision import choose
from pacslb.balance.persistence import PersistenceTable
from pacslb.balance.scheduler import Scheduler
from pacslb.balance.server import ServerState

#: Key used when the config gives no secret (see the module docstring for what that means).
DEFAULT_KEY = b"pacslb persistence cookie"
#: Bytes of the HMAC kept: 96 bits make collisions between nodes of one service impossible in practice and
#: guessing a value hopeless, while keeping the cookie short (16 characters).
VALUE_BYTES = 12


def cookie_value(service: str, node: str, secret: str | None) -> str:
    """The cookie value that names ``node`` in ``service``."""
    key = secret.encode() if secret else DEFAULT_KEY
    digest = hmac.new(key, f"{service}\0{node}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:VALUE_BYTES]).decode()


class CookieCodec:
    """Node name <-> cookie value for the nodes of one service."""

    def __init__(self, service: str, nodes: Iterable[str], secret: str | None) -> None:
        self.by_node = {node: cookie_value(service, node, secret) for node in nodes}
        self.by_value = {value.encode(): node for node, value in self.by_node.items()}

    def value(self, node: str) -> str:
        """The value for ``node`` (which must be one of the service's nodes)."""
        return self.by_node[node]

    def node(self, value: bytes) -> str | None:
        """The node a cookie value names, or None for a value that names none of this service's nodes."""
        return self.by_value.get(value)


#: What decided a request's node: its cookie, the source-IP table, or the scheduler.
HttpRule = Literal["cookie", "source_ip", "balance"]


def choose_with_cookie(
    servers: Sequence[ServerState],
    scheduler: Scheduler,
    table: PersistenceTable | None,
    key: str | None,
    offered: Sequence[bytes],
    codec: CookieCodec,
    now: float,
    exclude: Collection[ServerState] = (),
) -> tuple[ServerState, HttpRule] | None:
    """The node for one HTTP request, and the rule that chose it; None when no node can take it.

    Order of decision: a cookie value (of those ``offered``) naming a node that honours persistence (up,
    and online or drained: a drained node keeps its clients) and was not tried yet -> the source-IP table
    (``table``/``key``, when the service has one) -> the scheduler. A cookie naming a node that is down,
    halted or unknown is passed over: the client is re-balanced, and the driver gives it a fresh cookie.
    """
    for value in offered:
        node = codec.node(value)
        if node is None:
            continue
        for server in servers:
            if server.name == node:
                if server.honours_persistence and server not in exclude:
                    return server, "cookie"
                break
    decision = choose(servers, scheduler, table, key, now, exclude)
    if decision is None:
        return None
    return decision.server, "source_ip" if decision.rule == "persistence" else "balance"
