"""Balancers sharing their tables through Redis Sentinel, and through Redis over TLS (real redis-server).

A Redis master and one replica, three Sentinels (``redis-server sentinel.conf --sentinel``) watching the
master with a quorum of 2, and two pacslb processes whose store is
``redis+sentinel://s1,s2,s3/mymaster/0``: what the Redis Sentinel subsection of docs/high-availability.md
promises. Killing the master (SIGKILL) fails no client connection; the balancers report the store down,
then up and synced once Sentinel has promoted the replica, and share bindings again through it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
import redis as redis_py
from test_cluster_store import (
    WITHIN,
    NamedNode,
    PacslbFactory,
    RedisServer,
    balancer_config,
    start_pair,
    store_status,
    visit,
    wait_applied,
    wait_synced,
)

pytestmark = pytest.mark.peers

MASTER_NAME = "mymaster"
#: Sentinel's timers, short for a test: the master is subjectively down after 1 s without an answer; a
#: failover that has not completed is tried again after twice this timeout.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
#: A failover here takes about 2 s (down-after, the vote, the promotion); a busy machine takes longer.
FAILOVER_WITHIN = 30.0
#: Connections driven through the balancers while the master is away: one every PACE seconds (a steady
#: load, not a flood that would starve the balancers' own reconnection on a 2-core machine), at most
#: MAX_DRIVEN (FAILOVER_WITHIN's worth).
PACE = 0.005
MAX_DRIVEN = 6000


def sync_client(port: int, password: str | None = None) -> redis_py.Redis:
    return redis_py.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2.0, decode_responses=True)


class SentinelServer:
    """One Sentinel (``redis-server sentinel.conf --sentinel``) watching :data:`MASTER_NAME`."""

    def __init__(self, root: Path, master_port: int, auth_pass: str | None, password: str | None) -> None:
        self.root = root
        self.port = peers.free_port()
        self.master_port = master_port
        self.auth_pass = auth_pass  # the Redis servers' password
        self.password = password  # the Sentinel's own (requirepass)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.root}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if self.auth_pass:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {self.auth_pass}")
        if self.password:
            # Also what this Sentinel gives the others (they must all have the same one).
            lines.append(f"requirepass {self.password}")
        conf = self.root / "sentinel.conf"  # Sentinel rewrites it: it must be writable
        conf.write_text("\n".join(lines) + "\n")
        redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = peers._popen([redis_bin, str(conf), "--sentinel"], self.root / "sentinel.log")
        peers.wait_for(self._answers, WITHIN, f"Sentinel on {self.port} to answer")
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis_py.RedisError:
            return False

    def client(self) -> redis_py.Redis:
        return sync_client(self.port, self.password)

    def master(self) -> dict[str, str]:
        """What this Sentinel knows of the master (SENTINEL MASTER), as strings."""
        reply = self.client().execute_command("SENTINEL", "MASTER", MASTER_NAME)
        if isinstance(reply, dict):
            return {str(k): str(v) for k, v in reply.items()}
        return {str(reply[i]): str(reply[i + 1]) for i in range(0, len(reply), 2)}

    def master_port_now(self) -> int:
        _, port = self.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def stop(self) -> None:
        if self.proc is not None:
            peers._stop_process(self.proc, 10.0)
            self.proc = None


class SentinelSetup:
    """A master, one replica and three Sentinels on loopback; everything stopped by :meth:`stop`."""

    def __init__(self, root: Path, password: str | None = None, sentinel_password: str | None = None) -> None:
        self.root = root
        self.password = password
        auth = ["--masterauth", password] if password else []
        self.master = RedisServer(root / "master", password=password, extra=auth)
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelServer] = []
        self.sentinel_password = sentinel_password

    def start(self) -> SentinelSetup:
        auth = ["--masterauth", self.password] if self.password else []
        self.master.start()
        self.replica = RedisServer(
            self.root / "replica",
            password=self.password,
            extra=["--replicaof", "127.0.0.1", str(self.master.port), *auth],
        ).start()
        replica = self.redis(self.replica)
        peers.wait_for(
            lambda: replica.info("replication").get("master_link_status") == "up", WITHIN, "the replica to sync"
        )
        for i in range(3):
            sentinel = SentinelServer(
                self.root / f"sentinel{i + 1}", self.master.port, self.password, self.sentinel_password
            )
            self.sentinels.append(sentinel.start())

        # Before anything is killed, each Sentinel must know the replica and the two other Sentinels
        # (they find each other through the master every 2 s): otherwise there is no quorum to fail over.
        def ready() -> bool:
            for sentinel in self.sentinels:
                known = sentinel.master()
                if known.get("num-slaves") != "1" or known.get("num-other-sentinels") != "2":
                    return False
            return True

        peers.wait_for(ready, WITHIN, "the Sentinels to know the replica and each other", interval=0.2)
        return self

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def redis(self, server: RedisServer) -> redis_py.Redis:
        return sync_client(server.port, self.password)

    def pins(self, server: RedisServer) -> int:
        return len(self.redis(server).keys("pacslb:pin:*"))

    def kill_master(self) -> None:
        assert self.master.proc is not None
        self.master.proc.send_signal(signal.SIGKILL)
        self.master.stop()  # reaps it

    def wait_promoted(self) -> None:
        """Every Sentinel names the replica as the master, and the replica says it is one."""
        assert self.replica is not None
        replica = self.replica
        peers.wait_for(
            lambda: (
                all(s.master_port_now() == replica.port for s in self.sentinels)
                and self.redis(replica).info("replication").get("role") == "master"
            ),
            FAILOVER_WITHIN,
            "Sentinel to promote the replica",
            interval=0.1,
        )

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        if self.replica is not None:
            self.replica.stop()
        self.master.stop()


@pytest.fixture
def nodes() -> Iterator[list[NamedNode]]:
    made = [NamedNode(f"pacs{i}") for i in (1, 2, 3)]
    yield made
    for node in made:
        node.close()


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path / "redis")
    try:
        yield setup.start()
    finally:
        setup.stop()


def no_tracebacks(lbs: list[peers.PacslbProcess]) -> None:
    for lb in lbs:
        assert "Traceback" not in lb.log(), lb.log()


def test_the_loss_of_the_redis_master_fails_no_connection_and_sharing_resumes_through_the_new_one(
    pacslb: PacslbFactory, nodes: list[NamedNode], sentinel_setup: SentinelSetup
) -> None:
    setup = sentinel_setup
    ports, admins, lbs = start_pair(pacslb, nodes, setup.url)
    for admin in admins:
        wait_synced(admin)
    # A binding made through lb1 reaches lb2 through the master Sentinel names.
    bound = {f"127.0.9.{i}": "" for i in range(1, 7)}
    for i, ip in enumerate(bound):
        bound[ip] = visit(ports[0], ip)
        wait_applied(admins[1], i + 1)
    assert {ip: visit(ports[1], ip) for ip in bound} == bound
    peers.wait_for(lambda: setup.pins(setup.master) == len(bound), WITHIN, "the bindings in the master")
    assert setup.replica is not None
    peers.wait_for(lambda: setup.pins(setup.replica) == len(bound), WITHIN, "the bindings in the replica")

    marks = [lb.mark() for lb in lbs]
    applied_before = store_status(admins[1])["applied"]
    setup.kill_master()
    # Connections all the while: the clients bound before stay where they are on both balancers, and new
    # clients (through lb1 alone) get a node; until both balancers are synced through the new master.
    failures: list[str] = []
    new_clients: dict[str, str] = {}
    driven = 0

    def both_synced_again() -> bool:
        return all(lb.events("store_synced", since=m) for lb, m in zip(lbs, marks, strict=True))

    deadline = time.monotonic() + FAILOVER_WITHIN
    while not both_synced_again():
        assert driven < MAX_DRIVEN and time.monotonic() < deadline, f"not synced again after {driven} connections"
        for _ in range(10):
            ip = list(bound)[driven % len(bound)]
            try:
                got = visit(ports[driven % 2], ip)
                if got != bound[ip]:
                    failures.append(f"{ip} moved from {bound[ip]} to {got!r}")
                if driven % 10 == 0 and len(new_clients) < 20:
                    fresh = f"127.0.10.{len(new_clients) + 1}"
                    new_clients[fresh] = visit(ports[0], fresh)
                    if new_clients[fresh] not in {"pacs1", "pacs2", "pacs3"}:
                        failures.append(f"{fresh} got {new_clients[fresh]!r}")
            except OSError as exc:
                failures.append(f"{ip}: {exc!r}")
            driven += 1
            time.sleep(PACE)
    assert not failures, failures[:10]
    for lb, mark in zip(lbs, marks, strict=True):
        down = lb.wait_event("store_down", FAILOVER_WITHIN, since=mark)
        up = lb.wait_event("store_up", FAILOVER_WITHIN, since=mark)
        synced = lb.wait_event("store_synced", FAILOVER_WITHIN, since=mark)
        assert down.ts <= up.ts <= synced.ts, (down.line, up.line, synced.line)
    setup.wait_promoted()
    for admin in admins:
        wait_synced(admin)
    # What lb1 bound alone during the failover reached lb2 through the new master...
    wait_applied(admins[1], applied_before + len(new_clients))
    assert {ip: visit(ports[1], ip) for ip in new_clients} == new_clients
    # ...and a new client's binding made on lb2 now reaches lb1 through it.
    before = store_status(admins[0])["applied"]
    fresh = visit(ports[1], "127.0.11.1")
    wait_applied(admins[0], before + 1)
    assert visit(ports[0], "127.0.11.1") == fresh
    assert setup.pins(setup.replica) == len(bound) + len(new_clients) + 1
    peers.wait_for(
        lambda: sum(len(lb.events("conn")) for lb in lbs) >= driven + len(new_clients), WITHIN, "every conn line"
    )
    ends = {e.get("end") for lb in lbs for e in lb.events("conn")}
    assert ends <= {"ok", "client_closed", "server_closed"}, ends
    no_tracebacks(lbs)


def share_one(ports: list[int], admins: list[int], here: int, ip: str) -> str:
    """A new client through balancer ``here``: the other one learns its node, and sends it there too."""
    there = 1 - here
    before = store_status(admins[there])["applied"]
    node = visit(ports[here], ip)
    wait_applied(admins[there], before + 1)
    assert visit(ports[there], ip) == node, f"{ip} moved between the balancers"
    return node


def test_a_failover_asked_of_sentinel_moves_the_balancers_to_the_new_master_at_once(
    pacslb: PacslbFactory, nodes: list[NamedNode], sentinel_setup: SentinelSetup
) -> None:
    """``SENTINEL FAILOVER``: the replica is promoted while the old master lives on, still a writable master
    until Sentinel turns it into a replica some seconds later (which throws away what was written to it).
    The balancers must leave it as soon as the Sentinels name the new master, and what reached only the old
    one must still end up in the new one."""
    setup = sentinel_setup
    assert setup.replica is not None
    ports, admins, lbs = start_pair(pacslb, nodes, setup.url)
    for admin in admins:
        wait_synced(admin)
    share_one(ports, admins, 0, "127.0.12.1")
    # Not the balancers' first reconnection (that one writes everything anyway): one before, same master.
    marks = [lb.mark() for lb in lbs]
    master = setup.redis(setup.master)
    for kind in ("normal", "pubsub"):
        for client in master.client_list(_type=kind):
            if not client["name"].startswith("sentinel-") and client["id"] != str(master.client_id()):
                master.client_kill_filter(_id=client["id"])
    for lb, mark in zip(lbs, marks, strict=True):
        lb.wait_event("store_synced", WITHIN, since=mark)

    marks = [lb.mark() for lb in lbs]
    assert setup.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
    setup.wait_promoted()
    share_one(ports, admins, 0, "127.0.12.2")  # right after the switch: possibly through the old master
    for lb, mark in zip(lbs, marks, strict=True):
        down = lb.wait_event("store_down", FAILOVER_WITHIN, since=mark)
        assert "another master" in down.get("reason"), down.line  # not Sentinel closing the old one's links
        lb.wait_event("store_synced", FAILOVER_WITHIN, since=mark)
    share_one(ports, admins, 1, "127.0.12.3")
    peers.wait_for(lambda: setup.pins(setup.replica) == 3, WITHIN, "every binding in the new master")
    no_tracebacks(lbs)


def test_with_passwords_on_redis_and_on_the_sentinels(
    pacslb: PacslbFactory, nodes: list[NamedNode], tmp_path: Path
) -> None:
    """Redis servers with requirepass (and masterauth, for the replica and after a failover), Sentinels
    with auth-pass for them and a requirepass of their own: cluster.password_file is the Redis servers'
    password, cluster.sentinel_password_file the Sentinels'. Without the latter, the store says why."""
    setup = SentinelSetup(tmp_path / "redis", password="redis-secret-1", sentinel_password="sentinel-secret-2")
    try:
        setup.start()
        (tmp_path / "redis.password").write_text("redis-secret-1\n")
        (tmp_path / "sentinel.password").write_text("sentinel-secret-2\n")
        port, admin = peers.free_port(), peers.free_port()
        lonely = pacslb(
            balancer_config("lb0", port, admin, nodes, setup.url, password_file=str(tmp_path / "redis.password"))
        )
        down = lonely.wait_event("store_down", WITHIN)
        assert "MasterNotFoundError" in down.get("reason") and "auth" in down.get("reason").lower(), down.line
        assert visit(port, "127.0.14.1") in {"pacs1", "pacs2", "pacs3"}
        lonely.stop()

        ports, admins, lbs = start_pair(
            pacslb,
            nodes,
            setup.url,
            password_file=str(tmp_path / "redis.password"),
            sentinel_password_file=str(tmp_path / "sentinel.password"),
        )
        for admin in admins:
            wait_synced(admin)
        share_one(ports, admins, 0, "127.0.14.2")
        marks = [lb.mark() for lb in lbs]
        setup.kill_master()
        for lb, mark in zip(lbs, marks, strict=True):
            lb.wait_event("store_down", FAILOVER_WITHIN, since=mark)
            lb.wait_event("store_synced", FAILOVER_WITHIN, since=mark)
        setup.wait_promoted()
        share_one(ports, admins, 1, "127.0.14.3")
        assert setup.replica is not None and setup.pins(setup.replica) == 2
        no_tracebacks(lbs)
    finally:
        setup.stop()


def make_ca_and_server_cert(root: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a certificate it signs for 127.0.0.1 (openssl CLI): ca.pem, server.pem, server.key."""
    root.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True, timeout=30)

    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pacslb test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (root / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    )
    return root / "ca.pem", root / "server.pem", root / "server.key"


def redis_has_tls() -> bool:
    """Whether this redis-server was built with TLS (Debian's is): such a build tries to load the key pair
    and fails on a missing one; a build without TLS ignores them and fails to listen instead."""
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    args = [redis_bin, "--port", "0", "--tls-port", str(peers.free_port()), "--tls-cert-file", "/nonexistent"]
    args += ["--tls-key-file", "/nonexistent", "--tls-ca-cert-file", "/nonexistent", "--save", ""]
    try:
        done = subprocess.run(args, capture_output=True, timeout=10, check=False)
    except OSError:
        return True  # no redis-server at all: the test runs, and says so (peers tests fail, never skip)
    return b"Failed to configure TLS" in done.stdout + done.stderr


@pytest.mark.skipif(not redis_has_tls(), reason="this redis-server was built without TLS (no --tls-port)")
def test_rediss_with_a_private_ca(pacslb: PacslbFactory, nodes: list[NamedNode], tmp_path: Path) -> None:
    """rediss:// to a server whose certificate a private CA signed: refused (and said why) with the system's
    CAs, shared with cluster.ca_file naming that CA."""
    ca, cert, key = make_ca_and_server_cert(tmp_path / "tls")
    tls_port = peers.free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    tls += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    server = RedisServer(tmp_path / "redis-tls", extra=tls)  # its plain port is for the test's own look
    server.start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        port, admin = peers.free_port(), peers.free_port()
        untrusting = pacslb(balancer_config("lb0", port, admin, nodes, url))
        down = untrusting.wait_event("store_down", WITHIN)
        assert "certificate verify failed" in down.get("reason"), down.line
        assert visit(port, "127.0.15.1") in {"pacs1", "pacs2", "pacs3"}
        untrusting.stop()

        ports, admins, lbs = start_pair(pacslb, nodes, url, ca_file=str(ca))
        for admin in admins:
            wait_synced(admin)
        share_one(ports, admins, 0, "127.0.15.2")
        share_one(ports, admins, 1, "127.0.15.3")
        assert server.keys() == 2
        no_tracebacks(lbs)
    finally:
        server.stop()
