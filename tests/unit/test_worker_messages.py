"""Unit tests for the messages between the main process and its web workers
(pacslb/proxy/workers/messages.py): every kind survives the trip, and each end takes only its own."""

from __future__ import annotations

import pytest

from pacslb.balance.server import ServerState
from pacslb.config.loader import load_config_text
from pacslb.proxy.workers.messages import (
    Abort,
    BadMessage,
    Bind,
    Configure,
    Conn,
    ConnectFailed,
    Counts,
    Cut,
    CutDone,
    Ended,
    NodeState,
    State,
    Stop,
    ToMain,
    ToWorker,
    decode_to_main,
    decode_to_worker,
    encode,
)

CONFIG = """
services:
  web:
    listen: 127.0.0.1:8080
    mode: http
    servers: {a: 127.0.0.1:8081}
"""


def test_every_message_to_a_worker_arrives_as_sent() -> None:
    config = load_config_text(CONFIG)
    node = ServerState("a", "127.0.0.1", 8081, weight=3, health="down", admin="drain", down_elsewhere="dicom")
    messages: list[ToWorker] = [
        Configure(config),
        State({"web": [NodeState.of(node)]}),
        Conn(7, "web", ("10.0.0.5", 40000), "a", True),
        Abort(7),
        Cut("web", "a"),
        Stop("web"),
    ]
    for message in messages:
        assert decode_to_worker(encode(message)) == message
    assert NodeState.of(node) == NodeState("a", "down", "drain", 3, "dicom")


def test_every_message_to_the_main_process_arrives_as_sent() -> None:
    messages: list[ToMain] = [
        Ended(7),
        Bind(7, "b"),
        Bind(7, None),
        Counts({"web": {"a": (1, 2, 300, 4000)}}, {"web": {"no_server": 1}}),
        CutDone("web", "a", 2),
        ConnectFailed("web", "a"),
    ]
    for message in messages:
        assert decode_to_main(encode(message)) == message


def test_each_end_refuses_what_is_not_its_own() -> None:
    with pytest.raises(BadMessage):
        decode_to_main(encode(Abort(1)))
    with pytest.raises(BadMessage):
        decode_to_worker(encode(Ended(1)))
    with pytest.raises(BadMessage):
        decode_to_worker(encode(("conn", 1, "web", ("10.0.0.5", 1), None, False)))  # type: ignore[arg-type]
