"""Balancers sharing their persistence tables through a real Redis (redis-server from Debian).

Two pacslb processes (lb1, lb2) with the same services and the same store, as a pair behind a virtual IP
or several balancers behind DNS would be. Clients are sockets bound to their own loopback addresses; the
nodes are in-process TCP servers that say their name. What a user would check: a client reaches the same
node whichever balancer it comes through; a Redis outage fails no connection, and sharing resumes when
Redis is back, even empty; a wrong password is reported and fails nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import peers
import pytest
from peers import PacslbProcess

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]
REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
#: Bounds of the waits below: a change reaches the other balancer in milliseconds (the goal is 200 ms);
#: a machine busy with other work gets far more.
WITHIN = 15.0


class RedisServer:
    """One redis-server on a loopback port, without persistence; restartable on the same port."""

    def __init__(self, root: Path, password: str | None = None, extra: Sequence[str] = ()) -> None:
        self.root = root
        self.port = peers.free_port()
        self.password = password
        self.extra = list(extra)  # more redis-server options (replication, TLS)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.root.mkdir(parents=True, exist_ok=True)
        args = [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.root)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = peers._popen(args + self.extra, self.root / "redis.log")
        peers.wait_for(lambda: self.command("PING") in ("PONG", "NOAUTH"), WITHIN, "redis-server to answer")
        return self

    def command(self, *args: str) -> str:
        """One command through redis-cli's protocol, by hand (a RESP request on a socket)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
                parts = ([("AUTH", self.password)] if self.password else []) + [args]
                for part in parts:
                    request = b"*%d\r\n" % len(part) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in part)
                    sock.sendall(request)
                answers = b""
                while answers.count(b"\r\n") < len(parts):
                    more = sock.recv(65536)
                    if not more:
                        break
                    answers += more
                last = answers.split(b"\r\n")[-2] if answers.count(b"\r\n") >= len(parts) else b""
                return last.decode(errors="replace").lstrip("+-:$").split(" ")[0]
        except OSError:
            return ""

    def keys(self, pattern: str = "pacslb:pin:*") -> int:
        found = self.command("EVAL", f"return #redis.call('KEYS', '{pattern}')", "0")
        return int(found) if found.isdigit() else -1

    def stop(self) -> None:
        if self.proc is not None:
            peers._stop_process(self.proc, 10.0)
            self.proc = None


class NamedNode:
    """A TCP node that writes its name to every connection and closes it (``hold``: once the client has)."""

    def __init__(self, name: str, hold: bool = False) -> None:
        self.name = name
        self.hold = hold
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                if self.hold:
                    threading.Thread(target=self._held, args=(conn,), daemon=True).start()
                    continue
                with conn:
                    conn.sendall(self.name.encode())

    def _held(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(self.name.encode())
            while conn.recv(1024):
                pass

    def close(self) -> None:
        self.sock.close()


def visit_held(port: int, source_ip: str) -> str:
    """One connection to a node that holds it: the node's name, read as soon as it is sent; then closed."""
    with socket.socket() as sock:
        sock.bind((source_ip, 0))
        sock.settimeout(WITHIN)
        sock.connect(("127.0.0.1", port))
        return sock.recv(64).decode()


def visit(port: int, source_ip: str) -> str:
    """One connection from ``source_ip`` through the balancer on ``port``: the name of the node reached."""
    with socket.socket() as sock:
        sock.bind((source_ip, 0))
        sock.settimeout(WITHIN)
        sock.connect(("127.0.0.1", port))
        data = b""
        while chunk := sock.recv(1024):
            data += chunk
    return data.decode()


@pytest.fixture
def nodes() -> Iterator[list[NamedNode]]:
    made = [NamedNode(f"pacs{i}") for i in (1, 2, 3)]
    yield made
    for node in made:
        node.close()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def pinned(port: int, nodes: list[NamedNode], balance: str = "roundrobin", timeout: str = "5m") -> dict[str, Any]:
    """A tcp service over ``nodes`` with source-IP persistence and no health check."""
    return peers.service(
        port,
        {node.name: node.address for node in nodes},
        balance=balance,
        persistence={"type": "source_ip", "timeout": timeout},
        check={"type": "none"},
    )


def balancer_config(name: str, port: int, admin_port: int, nodes: list[NamedNode], store: str, **cluster: Any) -> str:
    spec = pinned(port, nodes)
    return peers.config_text(
        {"dicom": spec},
        workers=1,
        shutdown_grace="1s",
        admin=peers.admin_section(admin_port),
        cluster={"node": name, "store": store, **cluster},
    )


def store_status(admin_port: int) -> dict[str, Any]:
    status: dict[str, Any] = peers.admin_api(admin_port, "GET", "/api/v1/status", token="").json()
    return status["cluster"]["store"]


def wait_synced(admin_port: int) -> None:
    peers.wait_for(lambda: store_status(admin_port)["synced"], WITHIN, f"the balancer on {admin_port} to sync")


def wait_applied(admin_port: int, count: int) -> None:
    peers.wait_for(lambda: store_status(admin_port)["applied"] >= count, WITHIN, f"{count} bindings applied")


def start_pair(
    pacslb: PacslbFactory, nodes: list[NamedNode], store: str, **cluster: Any
) -> tuple[list[int], list[int], list[PacslbProcess]]:
    ports = [peers.free_port(), peers.free_port()]
    admins = [peers.free_port(), peers.free_port()]
    lbs = [pacslb(balancer_config(f"lb{i + 1}", ports[i], admins[i], nodes, store, **cluster)) for i in range(2)]
    return ports, admins, lbs


def test_a_client_reaches_the_same_node_through_either_balancer(
    pacslb: PacslbFactory, nodes: list[NamedNode], redis: RedisServer
) -> None:
    ports, admins, lbs = start_pair(pacslb, nodes, redis.url)
    for admin in admins:
        wait_synced(admin)
    clients = [f"127.0.2.{i}" for i in range(1, 21)]
    first: dict[str, str] = {}
    for i, ip in enumerate(clients):
        # Each client starts on one balancer or the other; the other learns of it in the background.
        here, there = (0, 1) if i % 2 == 0 else (1, 0)
        first[ip] = visit(ports[here], ip)
        wait_applied(admins[there], sum(1 for j in range(i + 1) if (j % 2 == 0) == (here == 0)))
    assert len(set(first.values())) == 3, f"the scheduler left a node out: {first}"
    for ip in clients:
        for port in ports:  # alternating between the balancers, the client stays where it started
            assert visit(port, ip) == first[ip], f"{ip} moved"
    # (A connection's line is written as it ends, which may be just after the client saw it end.)
    peers.wait_for(lambda: sum(len(lb.events("conn")) for lb in lbs) == 60, WITHIN, "60 connection lines")
    lines = [e for lb in lbs for e in lb.events("conn") if e.get("rule") == "persistence"]
    assert len(lines) == 40, f"every later connection should be decided by persistence: {len(lines)}"
    assert redis.keys() == 20


def test_a_restarted_balancer_loads_the_table_before_it_counts_as_synced(
    pacslb: PacslbFactory, nodes: list[NamedNode], redis: RedisServer
) -> None:
    port, admin = peers.free_port(), peers.free_port()
    config = balancer_config("lb1", port, admin, nodes, redis.url)
    lb = pacslb(config)
    wait_synced(admin)
    clients = [f"127.0.3.{i}" for i in range(1, 13)]
    before = {ip: visit(port, ip) for ip in clients}
    peers.wait_for(lambda: redis.keys() == len(clients), WITHIN, "every binding written to Redis")
    lb.stop()
    again = pacslb(config)
    wait_synced(admin)
    assert {ip: visit(port, ip) for ip in clients} == before
    assert again.events("store_synced")[-1].get("entries") == str(len(clients))


def test_losing_redis_fails_no_connection_and_sharing_resumes_when_it_returns_empty(
    pacslb: PacslbFactory, nodes: list[NamedNode], redis: RedisServer
) -> None:
    ports, admins, lbs = start_pair(pacslb, nodes, redis.url)
    for admin in admins:
        wait_synced(admin)
    redis.stop()
    for lb in lbs:
        lb.wait_event("store_down", WITHIN)
    assert not store_status(admins[0])["connected"]
    shown = peers.run_pacslb_cli("status", "--admin", f"http://127.0.0.1:{admins[0]}")
    assert f"store {redis.url} (this balancer: lb1): DOWN" in shown.output, shown.output
    # Alone, each balancer still serves, and keeps its own clients where they started.
    alone = {f"127.0.4.{i}": visit(ports[0], f"127.0.4.{i}") for i in range(1, 9)}
    assert all(alone.values())
    assert {ip: visit(ports[0], ip) for ip in alone} == alone
    # Redis comes back empty (a restart without persistence): the balancers write their tables again.
    redis.start()
    for lb in lbs:
        lb.wait_event("store_up", WITHIN)
    for admin in admins:
        wait_synced(admin)
    peers.wait_for(lambda: redis.keys() == len(alone), WITHIN, "lb1's bindings written again")
    wait_applied(admins[1], len(alone))
    assert {ip: visit(ports[1], ip) for ip in alone} == alone
    peers.wait_for(lambda: sum(len(lb.events("conn")) for lb in lbs) == 3 * len(alone), WITHIN, "every line")
    assert not [
        e for lb in lbs for e in lb.events("conn") if e.get("end") not in ("ok", "client_closed", "server_closed")
    ]


def test_a_subscription_cut_alone_is_noticed_and_the_balancer_reads_everything_again(
    pacslb: PacslbFactory, nodes: list[NamedNode], redis: RedisServer
) -> None:
    """Redis closes a balancer's subscription and nothing else (CLIENT KILL, or a Sentinel demoting the
    master). Subscribing again quietly would lose what is published meanwhile: the store must count that
    as down, then read every binding again."""
    ports, admins, lbs = start_pair(pacslb, nodes, redis.url)
    for admin in admins:
        wait_synced(admin)
    marks = [lb.mark() for lb in lbs]
    assert redis.command("CLIENT", "KILL", "TYPE", "pubsub") == "2"
    for lb, mark in zip(lbs, marks, strict=True):
        lb.wait_event("store_down", WITHIN, since=mark)
        lb.wait_event("store_synced", WITHIN, since=mark)
    before = store_status(admins[1])["applied"]
    node = visit(ports[0], "127.0.5.9")
    wait_applied(admins[1], before + 1)
    assert visit(ports[1], "127.0.5.9") == node


def test_a_redis_restarted_empty_is_refilled_with_every_binding_the_balancers_know(
    pacslb: PacslbFactory, nodes: list[NamedNode], redis: RedisServer
) -> None:
    """Another Redis process (restarted without persistence, or a replica promoted) may lack what the last one
    had: a balancer that finds a new run_id writes every entry it knows, not only what it changed alone."""
    ports, admins, lbs = start_pair(pacslb, nodes, redis.url)
    for admin in admins:
        wait_synced(admin)
    clients = {f"127.0.5.{i}": visit(ports[i % 2], f"127.0.5.{i}") for i in range(20, 26)}
    peers.wait_for(lambda: redis.keys() == len(clients), WITHIN, "every binding in Redis")
    # A first reconnection to the same Redis (the links cut, nothing lost): it writes what changed alone.
    marks = [lb.mark() for lb in lbs]
    assert int(redis.command("CLIENT", "KILL", "TYPE", "pubsub")) == 2
    for lb, mark in zip(lbs, marks, strict=True):
        lb.wait_event("store_synced", WITHIN, since=mark)
    # Then Redis restarts empty.
    marks = [lb.mark() for lb in lbs]
    redis.stop()
    redis.start()
    for lb, mark in zip(lbs, marks, strict=True):
        lb.wait_event("store_synced", WITHIN, since=mark)
    peers.wait_for(lambda: redis.keys() == len(clients), WITHIN, "every binding written again")
    assert {ip: visit(ports[1 - i % 2], ip) for i, ip in enumerate(clients, start=20)} == clients


def test_a_wrong_password_is_reported_and_fails_nothing(
    pacslb: PacslbFactory, nodes: list[NamedNode], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis-auth", password="right-password-123").start()
    try:
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-the-password\n")
        port, admin = peers.free_port(), peers.free_port()
        lb = pacslb(balancer_config("lb1", port, admin, nodes, server.url, password_file=str(wrong)))
        down = lb.wait_event("store_down", WITHIN)
        assert "password" in down.get("reason").lower() or "auth" in down.get("reason").lower(), down.line
        assert visit(port, "127.0.5.1") in {"pacs1", "pacs2", "pacs3"}
        # Just started and never synced: /healthz keeps keepalived from giving it the address, for a while.
        health = peers.admin_api(admin, "GET", "/healthz", token="")
        if store_status(admin)["starting"]:  # (it only goes from true to false: healthz was asked first)
            assert health.status_code == 503 and health.json()["reason"] == "store_not_synced", health.text
        peers.wait_for(
            lambda: peers.admin_api(admin, "GET", "/healthz", token="").status_code == 200,
            WITHIN + 10,
            "healthz to answer 200 once the grace is over (a Redis that stays away must not keep it down)",
        )
        assert store_status(admin)["synced"] is False
        metrics = peers.admin_api(admin, "GET", "/metrics", token="").text
        assert 'pacslb_store_connected{kind="redis"} 0.0' in metrics
        right = tmp_path / "right.password"
        right.write_text("right-password-123\n")
        port2, admin2 = peers.free_port(), peers.free_port()
        pacslb(balancer_config("lb2", port2, admin2, nodes, server.url, password_file=str(right)))
        wait_synced(admin2)
    finally:
        server.stop()


def server_admin(admin_port: int, node: str) -> str:
    return str(peers.admin_server(admin_port, "dicom", node)["admin"])


def test_a_drain_or_halt_made_on_one_balancer_holds_on_all_and_survives_a_restart(
    pacslb: PacslbFactory, nodes: list[NamedNode], redis: RedisServer
) -> None:
    ports, admins, lbs = start_pair(pacslb, nodes, redis.url)
    for admin in admins:
        wait_synced(admin)
    assert peers.admin_api(admins[0], "POST", "/api/v1/nodes/pacs2/halt").status_code == 200
    peers.wait_for(lambda: server_admin(admins[1], "pacs2") == "halt", WITHIN, "lb2 to halt pacs2")
    halted = lbs[1].wait_event("admin", WITHIN, server="pacs2", new="halt")
    assert halted.get("by") == "peer:lb1", halted.line
    assert peers.admin_api(admins[1], "POST", "/api/v1/nodes/pacs3/drain").status_code == 200
    peers.wait_for(lambda: server_admin(admins[0], "pacs3") == "drain", WITHIN, "lb1 to drain pacs3")
    # New clients now go to pacs1 only, through either balancer.
    assert {visit(ports[i % 2], f"127.0.6.{i}") for i in range(1, 7)} == {"pacs1"}
    # lb2 restarts: it takes the settings from the store, not from a state file it does not have.
    lbs[1].stop()
    again = pacslb(lbs[1].config_path.read_text())
    wait_synced(admins[1])
    assert server_admin(admins[1], "pacs2") == "halt" and server_admin(admins[1], "pacs3") == "drain"
    # Back online from the restarted one: on all.
    assert peers.admin_api(admins[1], "POST", "/api/v1/nodes/pacs2/online").status_code == 200
    peers.wait_for(lambda: server_admin(admins[0], "pacs2") == "online", WITHIN, "lb1 to put pacs2 online")
    assert again.events("admin", server="pacs2", new="online")


def test_with_balance_consistent_balancers_agree_with_no_store_at_all(
    pacslb: PacslbFactory, nodes: list[NamedNode]
) -> None:
    """First contact, no shared state: two balancers with ``balance: consistent`` choose alike."""
    ports = [peers.free_port(), peers.free_port()]
    for port in ports:
        spec = pinned(port, nodes, balance="consistent")
        pacslb(peers.config_text({"dicom": spec}, workers=1, shutdown_grace="1s"))
    clients = [f"127.0.7.{i}" for i in range(1, 31)]
    through_one = {ip: visit(ports[0], ip) for ip in clients}
    through_other = {ip: visit(ports[1], ip) for ip in reversed(clients)}
    assert through_one == through_other
    assert set(through_one.values()) == {"pacs1", "pacs2", "pacs3"}


def test_a_single_balancer_keeps_its_pins_across_a_restart(
    pacslb: PacslbFactory, nodes: list[NamedNode], tmp_path: Path
) -> None:
    """The memory store: the table is written beside the admin state file and read at start."""
    port, admin = peers.free_port(), peers.free_port()
    spec = pinned(port, nodes)
    state_file = tmp_path / "state" / "state.json"
    state_file.parent.mkdir()
    config = peers.config_text(
        {"dicom": spec}, workers=1, shutdown_grace="1s", admin=peers.admin_section(admin, state_file=str(state_file))
    )
    lb = pacslb(config)
    clients = [f"127.0.8.{i}" for i in range(1, 13)]
    before = {ip: visit(port, ip) for ip in clients}
    assert len(set(before.values())) == 3
    lb.stop()
    assert (tmp_path / "state" / "state.persistence.json").exists()
    again = pacslb(config)
    assert again.wait_event("persistence_loaded", WITHIN).get("entries") == str(len(clients))
    assert {ip: visit(port, ip) for ip in reversed(clients)} == before


def test_a_client_seen_on_one_balancer_longer_than_the_timeout_keeps_its_pin_on_the_other(
    pacslb: PacslbFactory, redis: RedisServer
) -> None:
    """Expiry without a write per connection: the other balancer's copy is renewed (touched) while the
    client keeps coming back, or keeps a connection open, for longer than the persistence timeout."""
    held = [NamedNode(f"pacs{i}", hold=True) for i in (1, 2, 3)]
    lbs: list[PacslbProcess] = []
    try:
        ports, admins = [peers.free_port(), peers.free_port()], [peers.free_port(), peers.free_port()]
        for i in range(2):
            spec = pinned(ports[i], held, timeout="2s")
            cluster = {"node": f"lb{i + 1}", "store": redis.url}
            text = peers.config_text(
                {"dicom": spec}, workers=1, shutdown_grace="1s", admin=peers.admin_section(admins[i]), cluster=cluster
            )
            lbs.append(pacslb(text))
        for admin in admins:
            wait_synced(admin)
        # A client that keeps a connection open through lb1 for three timeouts...
        with socket.socket() as long_lived:
            long_lived.bind(("127.0.9.1", 0))
            long_lived.settimeout(WITHIN)
            long_lived.connect(("127.0.0.1", ports[0]))
            node = long_lived.recv(64).decode()
            wait_applied(admins[1], 1)
            # ... and one that comes back through lb1 every quarter of a second for as long.
            other = visit_held(ports[0], "127.0.9.2")
            deadline = time.monotonic() + 6.0  # three timeouts: bounded, and no assertion on time
            while time.monotonic() < deadline:
                assert visit_held(ports[0], "127.0.9.2") == other
                time.sleep(0.25)
            # Through lb2 now: both are still pinned there (persistence decides, not the scheduler).
            assert visit_held(ports[1], "127.0.9.1") == node
            assert visit_held(ports[1], "127.0.9.2") == other
        lines = lbs[1].wait_events("conn", 2, timeout=WITHIN)
        rules = {e.get("client").rsplit(":", 1)[0]: e.get("rule") for e in lines}
        assert rules == {"127.0.9.1": "persistence", "127.0.9.2": "persistence"}, rules
    finally:
        for n in held:
            n.close()
