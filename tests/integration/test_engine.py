"""The engine in-process with small asyncio backends: maxconn, reload, removal, shutdown, no server.

Each backend greets a new connection with its name and a newline, then echoes, so a test can see which
node it reached. These tests run on uvloop, as production does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from inproc import echo_server, free_port, run

from pacslb.config import load_config, load_config_text
from pacslb.engine import Engine


async def backend(name: str) -> tuple[asyncio.Server, int]:
    return await echo_server(name.encode() + b"\n")


class Client:
    """A connection through pacslb; ``node`` is the greeting's name."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node: str) -> None:
        self.reader, self.writer, self.node = reader, writer, node

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        line = await asyncio.wait_for(reader.readline(), timeout)
        return cls(reader, writer, line.decode().strip())

    async def echo(self, data: bytes = b"ping", timeout: float = 5.0) -> bytes:
        self.writer.write(data)
        return await asyncio.wait_for(self.reader.readexactly(len(data)), timeout)

    def close(self) -> None:
        self.writer.close()


def config_text(port: int, servers: dict[str, int], extra: str = "", check: str = "{type: none}") -> str:
    lines = "\n".join(f"      {name}: 127.0.0.1:{p}" for name, p in servers.items())
    return f"services:\n  svc:\n    listen: 127.0.0.1:{port}\n    check: {check}\n{extra}    servers:\n{lines}\n"


def test_maxconn_holds_new_clients_in_the_queue_until_a_slot_frees() -> None:
    async def scenario() -> tuple[bool, bytes]:
        srv, bport = await backend("a")
        port = free_port()
        engine = Engine(load_config_text(config_text(port, {"a": bport}, "    maxconn: 2\n")))
        await engine.start()
        first = await Client.open(port)
        second = await Client.open(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # accepted by the kernel only
        try:
            await asyncio.wait_for(reader.readline(), 0.5)
            served_early = True
        except TimeoutError:
            served_early = False
        first.close()
        greeting = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        second.close()
        await engine.shutdown(grace=1)
        srv.close()
        return served_early, greeting

    served_early, greeting = run(scenario)
    assert served_early is False
    assert greeting == b"a\n"


def test_reload_keeps_open_connections_and_applies_new_servers(tmp_path: Path) -> None:
    async def scenario() -> tuple[bytes, set[str], bool, bytes]:
        srv_a, port_a = await backend("a")
        srv_b, port_b = await backend("b")
        port = free_port()
        path = tmp_path / "lb.yaml"
        path.write_text(config_text(port, {"a": port_a}))
        engine = Engine(load_config(path), str(path))
        await engine.start()
        long_lived = await Client.open(port)
        # New config: b added, a's weight 0 (no new clients for a).
        path.write_text(
            f"services:\n  svc:\n    listen: 127.0.0.1:{port}\n    check: {{type: none}}\n"
            f"    servers:\n      a: {{address: 127.0.0.1:{port_a}, weight: 0}}\n"
            f"      b: 127.0.0.1:{port_b}\n"
        )
        applied = await engine.reload()
        still = await long_lived.echo(b"after reload")
        nodes = set()
        for _ in range(4):
            c = await Client.open(port)
            nodes.add(c.node)
            c.close()
        # An invalid file is refused; the running config stays.
        path.write_text("services:\n  svc:\n    listen: nonsense\n")
        refused = not await engine.reload()
        c = await Client.open(port)
        after_refusal = await c.echo(b"still serving")
        c.close()
        long_lived.close()
        await engine.shutdown(grace=1)
        srv_a.close()
        srv_b.close()
        return still, nodes, applied and refused, after_refusal

    still, nodes, reloads_ok, after_refusal = run(scenario)
    assert still == b"after reload"
    assert nodes == {"b"}
    assert reloads_ok
    assert after_refusal == b"still serving"


def test_reload_moves_the_listener_and_drains_removed_services(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, str, bytes, bool]:
        srv, bport = await backend("a")
        port1, port2, port3 = free_port(), free_port(), free_port()
        path = tmp_path / "lb.yaml"
        path.write_text(
            config_text(port1, {"a": bport}).replace("  svc:", "  one:")
            + config_text(port2, {"a": bport}).replace("services:\n  svc:", "  two:")
        )
        engine = Engine(load_config(path), str(path))
        await engine.start()
        on_two = await Client.open(port2)
        # "one" moves to port3; "two" is removed.
        path.write_text(config_text(port3, {"a": bport}).replace("  svc:", "  one:"))
        assert await engine.reload()
        try:
            await asyncio.open_connection("127.0.0.1", port1)
            old_port_open = True
        except OSError:
            old_port_open = False
        moved = await Client.open(port3)
        moved.close()
        drained = await on_two.echo(b"removed service, open connection")
        try:
            await asyncio.open_connection("127.0.0.1", port2)
            removed_open = True
        except OSError:
            removed_open = False
        on_two.close()
        await engine.shutdown(grace=1)
        srv.close()
        return old_port_open, moved.node, drained, removed_open

    old_port_open, moved_node, drained, removed_open = run(scenario)
    assert old_port_open is False
    assert moved_node == "a"
    assert drained == b"removed service, open connection"
    assert removed_open is False


def test_shutdown_closes_lingering_connections_after_the_grace() -> None:
    async def scenario() -> tuple[bytes, float]:
        srv, bport = await backend("a")
        port = free_port()
        engine = Engine(load_config_text(config_text(port, {"a": bport})))
        await engine.start()
        client = await Client.open(port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await engine.shutdown(grace=0.3)
        took = loop.time() - started
        try:
            rest = await asyncio.wait_for(client.reader.read(), 5)
        except ConnectionError:
            rest = b""
        client.close()
        srv.close()
        return rest, took

    rest, took = run(scenario)
    assert rest == b""  # closed by pacslb, not left hanging
    assert took >= 0.3


def test_no_usable_server_closes_the_client_at_once_and_recovers() -> None:
    async def scenario() -> tuple[bytes, str]:
        dead = free_port()
        port = free_port()
        check = "{type: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}"
        engine = Engine(load_config_text(config_text(port, {"a": dead}, check=check)))
        await engine.start()
        await asyncio.sleep(0.3)  # the first check has taken "a" down
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closed = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        # The node comes back on its port: the service recovers by itself.
        srv = await asyncio.start_server(lambda r, w: (w.write(b"a\n"), None)[1], "127.0.0.1", dead)
        node = ""
        deadline = asyncio.get_running_loop().time() + 30  # for a loaded machine; normally a few tenths
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            try:
                client = await Client.open(port, timeout=1)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                continue
            node = client.node
            client.close()
            if node:
                break
        await engine.shutdown(grace=1)
        srv.close()
        return closed, node

    closed, node = run(scenario)
    assert closed == b""
    assert node == "a"


def test_a_reload_that_removes_a_checked_server_stops_its_monitor(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, bool, list[str]]:
        srv_a, port_a = await backend("a")
        srv_b, port_b = await backend("b")
        port = free_port()
        check = "{type: tcp, interval: 100ms, timeout: 100ms}"
        path = tmp_path / "lb.yaml"
        path.write_text(config_text(port, {"a": port_a, "b": port_b}, check=check))
        engine = Engine(load_config(path), str(path))
        await engine.start()
        old = engine.monitors[("svc", "a")]
        old_task = old._task
        await asyncio.sleep(0.3)  # a few checks of "a" have run
        path.write_text(config_text(port, {"b": port_b}, check=check))
        applied = await engine.reload()
        for _ in range(50):  # bounded: 5 s; the stop is at once
            if old_task is not None and old_task.done():
                break
            await asyncio.sleep(0.1)
        stopped = old_task is not None and old_task.done()
        left = sorted(name for _, name in engine.monitors)
        await engine.shutdown(grace=1)
        srv_a.close()
        srv_b.close()
        return applied, stopped, left

    applied, stopped, left = run(scenario)
    assert applied and stopped
    assert left == ["b"]


def test_source_ip_persistence_with_netmask() -> None:
    async def scenario() -> tuple[dict[str, set[str]], set[str]]:
        backends = [await backend(n) for n in ("a", "b", "c")]
        port = free_port()
        servers = {n: p for n, (_, p) in zip("abc", backends, strict=True)}
        extra = "    balance: roundrobin\n    persistence: {type: source_ip, netmask: 24}\n"
        engine = Engine(load_config_text(config_text(port, servers, extra)))
        await engine.start()
        seen: dict[str, set[str]] = {}
        for source in ["127.0.1.1", "127.0.1.2", "127.0.2.1", "127.0.2.2", "127.0.3.1", "127.0.3.9"] * 3:
            client = await Client.open(port, source=source)
            seen.setdefault(source.rsplit(".", 1)[0], set()).add(client.node)
            client.close()
        await engine.shutdown(grace=1)
        for srv, _ in backends:
            srv.close()
        return seen, set().union(*seen.values())

    seen, used = run(scenario)
    assert all(len(nodes) == 1 for nodes in seen.values()), seen  # one /24, one node
    assert len(used) == 3  # three /24 networks spread over three nodes by round robin


def stuffed_listener() -> tuple[socket.socket, list[socket.socket], int]:
    """A port whose accept queue is full and never served: a connect to it gets no answer (the kernel drops
    the SYN), as to a node that hangs. Returns the listener, the connections filling it, and the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    for _ in range(2):  # a backlog of 0 still queues one; the second fills it for good
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    return listener, fillers, port


def test_a_node_that_does_not_answer_the_connect_is_passed_over_after_the_timeout() -> None:
    async def scenario() -> tuple[str, list[str], int]:
        srv, bport = await backend("b")
        listener, fillers, hung = stuffed_listener()
        port = free_port()
        extra = "    balance: roundrobin\n    timeouts: {connect: 300ms}\n"
        engine = Engine(load_config_text(config_text(port, {"a": hung, "b": bport}, extra)))
        await engine.start()
        nodes = []
        for _ in range(2):  # round robin: one of the two goes to "a" first
            client = await Client.open(port, timeout=5)
            nodes.append(client.node)
            assert await client.echo() == b"ping"
            client.close()
        service = engine.services["svc"]
        tasks = len(service.tasks)
        await engine.shutdown(grace=1)
        srv.close()
        listener.close()
        for filler in fillers:
            filler.close()
        return nodes[0], nodes, tasks

    _, nodes, tasks = run(scenario)
    assert nodes == ["b", "b"]  # "a" never answered; its client went on to "b"
    assert tasks == 0  # tcp mode holds no task per connection


def test_shutdown_during_a_connect_closes_the_client() -> None:
    async def scenario() -> tuple[bytes, int, int]:
        listener, fillers, hung = stuffed_listener()
        port = free_port()
        engine = Engine(load_config_text(config_text(port, {"a": hung}, "    timeouts: {connect: 30s}\n")))
        await engine.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.2)
        service = engine.services["svc"]
        connecting = service.connections
        await engine.shutdown(grace=0.2)  # the connect is still pending: closed at the end of the grace
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        listener.close()
        for filler in fillers:
            filler.close()
        return rest, connecting, service.servers[0].active

    rest, connecting, active = run(scenario)
    assert connecting == 1
    assert rest == b""
    assert active == 0
