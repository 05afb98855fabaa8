"""The clustered pair, measured: ``python bench/ha.py [--rounds 10]`` (or ``python bench/run.py --cases ha,store``).

Two cases, each printing figures and ratios, never asserting:

``ha``: failover. One lab of network namespaces (tests/ha/netns.py, imported, not copied: a bridge in a
namespace of its own, so the host's network is never touched) holds three balancer pairs side by side,
the same topology for each: a pacslb pair (pacslb and the keepalived.conf ``pacslb keepalived`` writes,
Redis store, advert 200 ms, VRRPv3, nopreempt), an HAProxy 2.6 pair with a ``peers`` section syncing its
stick table and a keepalived.conf of the same shape and timers, and the same HAProxy pair with HAProxy's
usual advert of 1 s (VRRPv2). A backend host runs Redis and three nginx nodes; a client host holds the
client addresses and runs ``bench/haclient.py``, the timed client. Each round, for each pair in an order
rotated by one per round: 20 new client addresses make a first request through the virtual IP (each gets
a node), one second later the master's link is cut (``ip link set eth0 down`` in its namespace), and the
client probes the virtual IP with a new connection every 10 ms until one is answered. Failover time: from
the cut to that first answer. Then each of the 20 clients asks again: kept = how many reached the node they
had. Then the link comes back, and the bench waits until the pair has settled (the restored balancer is
BACKUP, nopreempt leaving the address where it is; pacslb: both report their role and are synced with
Redis; HAProxy: both peers sessions are up) and two seconds more. The next round cuts the new master.

``store``: what the Redis store costs on the connection rate. One pacslb on loopback, ``mode: tcp``,
``source_ip`` persistence, two nginx nodes, with the memory store and with a Redis store (redis-server on
loopback), in interleaved rounds; the bench's Python client (bench/loadgen.py) makes short connections
from 250 source addresses (127.0.0.2-251), so each connection changes its client's entry (its expiry at
open and at close) and the store writes about every connection's entry, coalesced per 20 ms.

Owns the lab, the pairs and their configs, the rounds and the figures. Everything it starts runs inside
namespaces it made (or, for ``store``, on loopback ports) and is stopped, and the namespaces deleted, when
the case ends, also on an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import abc
import argparse
import collections
import contextlib
import json
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import machine, peers, report
from bench.cases.common import Context, Subject, measure_all, run_loadgen
from bench.peers import Node
from bench.procs import BenchError, Ports, Processes, raise_nofile, tree_cpu_seconds
from bench.report import CaseResult, Comparison, Metric

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "ha"))
import netns  # noqa: E402  (tests/ha/netns.py: the lab of the failover tests)

#: The bench's namespaces get a prefix of their own: the failover tests sweep every "pacslb-ha-" namespace
#: when they start, which would tear down a bench running meanwhile (and this bench's sweep, theirs).
netns.PREFIX = "pacslb-bench-"

KEEPALIVED = "/usr/sbin/keepalived"
REDIS = "/usr/bin/redis-server"
CURL = "/usr/bin/curl"

#: The lab's network: 10.98.0.0/16 inside the namespaces only.
NET = "10.98"
PREFIX_LEN = 16
BACKEND = f"{NET}.0.20"  # Redis; the nginx nodes are .21, .22, .23
NODES = [f"{NET}.0.2{i}" for i in (1, 2, 3)]
PROBE_SOURCE = f"{NET}.0.50"
PORT = 8080
ADMIN = "127.0.0.1:9900"
#: Client addresses with a node before each failover (the goal: every one keeps it).
CLIENTS_PER_ROUND = 20
#: Between the clients' first requests and the cut: the pins have this long to reach the other balancer.
PIN_AGE = 1.0
#: The probe: a new connection every PROBE_INTERVAL; each attempt given up after ATTEMPT_TIMEOUT.
PROBE_INTERVAL = 0.01
ATTEMPT_TIMEOUT = 3.0
#: A failover not seen within this is a failed round.
GIVE_UP = 30.0
#: Bounds of the waits for a pair to start or settle (keepalived takes seconds; a busy machine, more).
WITHIN = 40.0
#: After a pair has settled, before its next round: quiet time, the same for every pair.
SETTLE = 2.0
#: The store case: source addresses of the client (each its own persistence entry), concurrency.
STORE_SOURCES = 250
STORE_CONCURRENCY = 64

_NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
user root;
pid {root}/nginx-{name}.pid;
error_log {root}/nginx-{name}.err warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp-{name};
    server {{
        listen {address}:80;
        location / {{ default_type text/plain; return 200 "{name}\\n"; }}
    }}
}}
"""


def client_addresses(count: int) -> list[str]:
    """The client host's addresses for the rounds: 10.98.1.1, 10.98.1.2, ... (250 per /24)."""
    return [f"{NET}.{1 + i // 250}.{1 + i % 250}" for i in range(count)]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Client:
    """bench/haclient.py running in the client's namespace, driven over its standard input and output."""

    def __init__(self, host: netns.Host, log: Path) -> None:
        env = dict(os.environ) | peers.helper_env() | {"PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                host.command([peers.python(), "-m", "bench.haclient"]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                env=env,
                cwd=ROOT,
            )
        host.procs.append(self.proc)  # stopped with the lab
        self.log = log
        self._read(15.0)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise BenchError(f"the client stopped answering: {self.log.read_text(errors='replace')[-300:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def fetch(self, vip: str, sources: list[str], timeout: float = 2.0) -> dict[str, str]:
        command = {"op": "fetch", "host": vip, "port": PORT, "sources": sources, "timeout": timeout}
        nodes: dict[str, str] = self.ask(command, timeout + 10)["nodes"]
        return nodes

    def probe(self, vip: str) -> dict[str, Any]:
        command = {
            "op": "probe",
            "host": vip,
            "port": PORT,
            "source": PROBE_SOURCE,
            "interval": PROBE_INTERVAL,
            "attempt_timeout": ATTEMPT_TIMEOUT,
            "give_up": GIVE_UP,
        }
        return self.ask(command, GIVE_UP + 15)


class Balancer(abc.ABC):
    """One balancer host of a pair: its load balancer and its keepalived."""

    def __init__(self, pair: Pair, host: netns.Host, priority: int, peer: netns.Host) -> None:
        self.pair = pair
        self.host = host
        self.priority = priority
        self.peer = peer
        self.name = host.name
        self.root = pair.root / host.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.keepalived_log = self.root / "keepalived.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.keepalived_conf = ""

    def state(self) -> str:
        """The last state keepalived entered here (MASTER, BACKUP, FAULT), from its log; "" before any."""
        try:
            text = self.keepalived_log.read_text(errors="replace")
        except OSError:
            return ""
        found = ""
        for line in text.splitlines():
            if "Entering " in line and " STATE" in line:
                found = line.split("Entering ", 1)[1].split(" STATE", 1)[0].strip()
        return found

    def holds_vip(self) -> bool:
        return self.host.has_address(self.pair.vip)

    def start_keepalived(self, conf: str) -> None:
        path = self.root / "keepalived.conf"
        path.write_text(conf)
        test = subprocess.run([KEEPALIVED, "--config-test", "-f", str(path)], capture_output=True, text=True)
        if test.returncode != 0:
            raise BenchError(f"keepalived refused {path}: {(test.stdout + test.stderr).strip()[-300:]}")
        self.host.popen(
            [KEEPALIVED, "-n", "-l", "-D", "-G", "-P", "-f", str(path),
             "-p", str(self.root / "keepalived.pid"), "-r", str(self.root / "vrrp.pid")],
            self.keepalived_log,
        )  # fmt: skip

    # What differs between pacslb and HAProxy.
    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def ready(self) -> bool:
        """This balancer serves and shares its state with its peer (synced / peers session up)."""


class PacslbBalancer(Balancer):
    def config(self) -> dict[str, Any]:
        return {
            "services": {
                "web": {
                    "listen": f"0.0.0.0:{PORT}",
                    "mode": "http",
                    "balance": "roundrobin",
                    "persistence": {"type": "source_ip", "timeout": "30m"},
                    "check": {
                        "type": "http",
                        "method": "GET",
                        "path": "/",
                        "interval": "500ms",
                        "timeout": "500ms",
                        "rise": 1,
                    },
                    "servers": {f"web{i}": f"{address}:80" for i, address in enumerate(NODES, 1)},
                }
            },
            "workers": 1,
            "shutdown_grace": "1s",
            "admin": {"listen": ADMIN},
            "cluster": {
                "node": self.name,
                "store": f"redis://{BACKEND}:6379/0",
                "vrrp": {
                    "interface": "eth0",
                    "router_id": self.pair.router_id,
                    "priority": self.priority,
                    "virtual_ips": [f"{self.pair.vip}/{PREFIX_LEN}"],
                    "peers": [self.peer.address],
                    # keepalived hears of process events only in the host's own network namespace.
                    "track_process": False,
                },
            },
        }

    def start(self) -> None:
        path = self.root / "pacslb.yaml"
        path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        env = dict(os.environ) | peers.helper_env() | {"PYTHONUNBUFFERED": "1"}
        self.proc = self.host.popen(
            [peers.python(), "-m", "pacslb", "run", str(path)], self.root / "pacslb.log", env=env, cwd=str(self.root)
        )
        wait_for(lambda: self.status() is not None, WITHIN, f"pacslb on {self.name} to answer its admin API")
        made = subprocess.run(
            [peers.python(), "-m", "pacslb", "keepalived", str(path)],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
        )  # fmt: skip
        if made.returncode != 0:
            raise BenchError(f"pacslb keepalived {path} failed: {made.stderr.strip()[-300:]}")
        self.keepalived_conf = made.stdout

    def status(self) -> Any:
        done = self.host.run(
            [CURL, "-sS", "--max-time", "5", "-H", "X-Pacslb-Request: 1", f"http://{ADMIN}/api/v1/status"], timeout=30
        )
        if done.returncode != 0 or not done.stdout:
            return None
        with contextlib.suppress(ValueError):
            return json.loads(done.stdout)
        return None

    def ready(self) -> bool:
        status = self.status() or {}
        store = status.get("cluster", {}).get("store", {})
        want = {"MASTER": "master", "BACKUP": "backup"}.get(self.state())
        return bool(store.get("synced")) and want is not None and status.get("role") == want


class HaproxyBalancer(Balancer):
    def config(self) -> str:
        a, b = self.pair.balancers[0].host, self.pair.balancers[1].host
        servers = [f"    server web{i} {address}:80 check inter 500 rise 1" for i, address in enumerate(NODES, 1)]
        return "\n".join(
            [
                "global",
                "    maxconn 4096",
                "    nbthread 1",
                f"    stats socket {self.socket} mode 600 level admin",
                "defaults",
                "    mode http",
                "    timeout connect 5s",
                "    timeout client 30s",
                "    timeout server 30s",
                "peers pair",
                f"    peer {a.name} {a.address}:10000",
                f"    peer {b.name} {b.address}:10000",
                "listen web",
                f"    bind 0.0.0.0:{PORT}",
                "    balance roundrobin",
                "    stick-table type ip size 100k expire 30m peers pair",
                "    stick on src",
                *servers,
                "",
            ]
        )

    @property
    def socket(self) -> Path:
        return self.root / "haproxy.sock"

    def start(self) -> None:
        path = self.root / "haproxy.cfg"
        path.write_text(self.config())
        check = subprocess.run([peers.HAPROXY, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchError(f"haproxy refused {path}: {(check.stdout + check.stderr).strip()[-300:]}")
        # -L names the local peer; `ip netns exec` execs haproxy, so the PID is haproxy's own.
        self.proc = self.host.popen([peers.HAPROXY, "-db", "-L", self.name, "-f", str(path)], self.root / "haproxy.log")
        wait_for(lambda: self.command("show info"), WITHIN, f"haproxy on {self.name} to answer on its socket")
        self.keepalived_conf = self.pair.haproxy_keepalived(self)

    def command(self, text: str) -> str:
        """One command on HAProxy's stats socket (a file: reachable from any network namespace)."""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket))
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
            return b"".join(chunks).decode(errors="replace")
        return ""

    def ready(self) -> bool:
        # `show peers`: the remote peer's line says last_status=ESTA while its session is established.
        lines = [line for line in self.command("show peers").splitlines() if f"id={self.peer.name}(" in line]
        return self.state() in ("MASTER", "BACKUP") and bool(lines) and "last_status=ESTA" in lines[0]


class Pair:
    """Two balancer hosts, one virtual IP; ``balancers[0]`` has the higher priority and starts as master."""

    def __init__(
        self,
        key: str,
        label: str,
        kind: type[Balancer],
        hosts: tuple[netns.Host, netns.Host],
        vip: str,
        router_id: int,
        root: Path,
        *,
        advert: float = 0.2,
        vrrp_version: int = 3,
    ) -> None:
        self.key = key
        self.label = label
        self.vip = vip
        self.router_id = router_id
        self.advert = advert
        self.vrrp_version = vrrp_version
        self.root = root / key
        self.balancers: list[Balancer] = []
        self.balancers.append(kind(self, hosts[0], 150, hosts[1]))
        self.balancers.append(kind(self, hosts[1], 100, hosts[0]))

    def haproxy_keepalived(self, balancer: Balancer) -> str:
        """keepalived.conf for an HAProxy balancer, the shape of pacslb's: both BACKUP with nopreempt,
        unicast adverts, the VIP, a health script (HAProxy's process alive) that puts it in FAULT."""
        assert balancer.proc is not None
        return f"""global_defs {{
    router_id {balancer.name}
    enable_script_security
    script_user root
    vrrp_version {self.vrrp_version}
}}
vrrp_script haproxy_alive {{
    script "/usr/bin/kill -0 {balancer.proc.pid}"
    interval 1
    timeout 1
    fall 2
    rise 2
    weight 0
    init_fail
}}
vrrp_instance haproxy {{
    state BACKUP
    interface eth0
    virtual_router_id {self.router_id}
    priority {balancer.priority}
    advert_int {self.advert:g}
    nopreempt
    unicast_peer {{
        {balancer.peer.address}
    }}
    virtual_ipaddress {{
        {self.vip}/{PREFIX_LEN} dev eth0
    }}
    track_script {{
        haproxy_alive
    }}
}}
"""

    def start(self) -> None:
        for balancer in self.balancers:
            balancer.start()
        for balancer in self.balancers:
            balancer.start_keepalived(balancer.keepalived_conf)

    def master(self) -> Balancer | None:
        masters = [b for b in self.balancers if b.state() == "MASTER"]
        return masters[0] if len(masters) == 1 else None

    def settled(self) -> bool:
        states = sorted(b.state() for b in self.balancers)
        return states == ["BACKUP", "MASTER"] and all(b.ready() for b in self.balancers)

    def wait_settled(self, client: Client) -> None:
        wait_for(self.settled, WITHIN, f"{self.label} to settle (one MASTER, one BACKUP, state shared)", 0.2)
        master = self.master()
        assert master is not None
        wait_for(master.holds_vip, WITHIN, f"the master of {self.label} to hold {self.vip}")
        wait_for(lambda: client.fetch(self.vip, [PROBE_SOURCE])[PROBE_SOURCE], WITHIN, f"{self.vip} to answer")


def failover_round(pair: Pair, client: Client, sources: list[str]) -> dict[str, float]:
    """One failover of ``pair``: pins, the master's link cut, the probe, the pins again, the link back."""
    master = pair.master()
    if master is None:
        raise BenchError(f"{pair.label}: no single master before the round")
    before = client.fetch(pair.vip, sources)
    unanswered = [source for source, node in before.items() if not node]
    if unanswered:
        raise BenchError(f"{pair.label}: {len(unanswered)} clients got no answer before the cut")
    time.sleep(PIN_AGE)
    cut = time.monotonic()
    try:
        master.host.link(False)
        cut_done = time.monotonic()
        probe = client.probe(pair.vip)
        after = client.fetch(pair.vip, sources)
    finally:
        master.host.link(True)
    if probe["first"] is None:
        raise BenchError(f"{pair.label}: the virtual IP did not answer within {GIVE_UP:.0f} s of the cut")
    kept = sum(1 for source in sources if after.get(source) == before[source])
    return {
        "failover": probe["first"] - cut,
        "kept": float(kept),
        "clients": float(len(sources)),
        "cut_cmd_ms": 1000 * (cut_done - cut),
        "probe_lag_ms": 1000 * (probe["started"] - cut_done),
        "attempts": float(probe["attempts"]),
        "nodes": float(len(set(before.values()))),
    }


@contextlib.contextmanager
def lab_of(root: Path) -> Iterator[netns.Lab]:
    netns.sweep()  # leftovers of a bench run that was killed (only the bench's own prefix)
    lab = netns.Lab(root)
    try:
        yield lab
    finally:
        lab.close()


FAILOVER_METRICS = [
    Metric("failover", "failover s", higher_is_better=False, digits=2),
    Metric("kept", f"clients kept of {CLIENTS_PER_ROUND}", digits=0),
]


def run_failover(ctx: Context, *, slow_advert: bool = True) -> CaseResult:
    rounds = ctx.repeat
    case = CaseResult(
        "ha",
        f"(f) failover of a clustered pair: the master's link cut, {rounds} rounds; time until the virtual IP "
        f"answers again, and how many of {CLIENTS_PER_ROUND} clients pinned {PIN_AGE:g} s before reach the "
        "same node after",
        list(FAILOVER_METRICS),
    )
    why = netns.available()
    if why is not None:
        case.error = why
        return case
    for binary in (KEEPALIVED, REDIS, peers.NGINX, peers.HAPROXY, CURL):
        if not Path(binary).exists():
            case.error = f"{binary} is missing: run `sh bench/install.sh`"
            return case
    root = ctx.workdir / "lab"
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    sources = client_addresses(CLIENTS_PER_ROUND * rounds)
    with lab_of(root) as lab:
        p1, p2 = lab.host("p1", [f"{NET}.0.1/{PREFIX_LEN}"]), lab.host("p2", [f"{NET}.0.2/{PREFIX_LEN}"])
        h1, h2 = lab.host("h1", [f"{NET}.0.3/{PREFIX_LEN}"]), lab.host("h2", [f"{NET}.0.4/{PREFIX_LEN}"])
        backend = lab.host("be", [f"{a}/{PREFIX_LEN}" for a in [BACKEND, *NODES]])
        client_host = lab.host("client", [f"{a}/{PREFIX_LEN}" for a in [PROBE_SOURCE, *sources]])
        pairs = [
            Pair("pacslb", "pacslb pair (Redis store), advert 200 ms", PacslbBalancer, (p1, p2), f"{NET}.0.100", 61,
                 root),
            Pair("haproxy", "HAProxy 2.6 pair (peers), advert 200 ms", HaproxyBalancer, (h1, h2), f"{NET}.0.101",
                 62, root),
        ]  # fmt: skip
        if slow_advert:
            k1, k2 = lab.host("k1", [f"{NET}.0.5/{PREFIX_LEN}"]), lab.host("k2", [f"{NET}.0.6/{PREFIX_LEN}"])
            pairs.append(
                Pair("haproxy-1s", "HAProxy 2.6 pair (peers), advert 1 s (VRRPv2)", HaproxyBalancer, (k1, k2),
                     f"{NET}.0.102", 63, root, advert=1.0, vrrp_version=2)
            )  # fmt: skip
        backend.popen(
            [REDIS, "--bind", BACKEND, "--port", "6379", "--save", "", "--appendonly", "no", "--dir", str(root),
             "--protected-mode", "no"],
            root / "redis.log",
        )  # fmt: skip
        for i, address in enumerate(NODES, 1):
            (root / f"tmp-web{i}").mkdir(exist_ok=True)
            conf = root / f"nginx-web{i}.conf"
            conf.write_text(_NGINX_CONF.format(root=root, name=f"web{i}", address=address))
            backend.popen([peers.NGINX, "-c", str(conf), "-p", str(root)], root / f"nginx-web{i}.log")
        client = Client(client_host, root / "client.log")
        for pair in pairs:
            case.subjects[pair.key] = pair.label
            pair.start()
        for pair in pairs:
            ctx.say(f"[ha] waiting for {pair.label} to settle")
            pair.wait_settled(client)
        ctx.say(f"[ha] {len(pairs)} pairs up; {rounds} rounds")
        cuts = {pair.key: collections.Counter[str]() for pair in pairs}
        for rep in range(rounds):
            shift = rep % len(pairs)
            batch = sources[rep * CLIENTS_PER_ROUND : (rep + 1) * CLIENTS_PER_ROUND]
            for pair in pairs[shift:] + pairs[:shift]:
                master = pair.master()
                try:
                    values = failover_round(pair, client, batch)
                except BenchError as exc:
                    case.notes.append(f"{pair.label}, round {rep + 1}: failed: {exc}")
                    ctx.say(f"[ha] round {rep + 1}/{rounds} {pair.label}: FAILED {exc}")
                    with contextlib.suppress(BenchError):
                        pair.wait_settled(client)
                    continue
                case.add_run(pair.key, values)
                cuts[pair.key][master.name if master else "?"] += 1
                ctx.say(
                    f"[ha] round {rep + 1}/{rounds} {pair.label}: cut {master.name if master else '?'}; "
                    f"answered after {values['failover']:.3f} s; kept {values['kept']:.0f}/{values['clients']:.0f} "
                    f"(clients on {values['nodes']:.0f} nodes; cut command {values['cut_cmd_ms']:.0f} ms)"
                )
                try:
                    pair.wait_settled(client)
                except BenchError as exc:
                    case.notes.append(f"{pair.label}, after round {rep + 1}: {exc}")
                    ctx.say(f"[ha] after round {rep + 1}/{rounds} {pair.label}: {exc}")
                time.sleep(SETTLE)
        for pair in pairs:
            for balancer in pair.balancers:
                log = balancer.keepalived_log.read_text(errors="replace") if balancer.keepalived_log.exists() else ""
                failed = sum(1 for line in log.splitlines() if "VRRP_Script(" in line and "succeeded" not in line)
                skipped = log.count("is already running, expect idle - skipping run")
                faults = log.count("Entering FAULT STATE")
                case.notes.append(
                    f"{pair.label}, {balancer.name}: keepalived saw its health script fail or time out {failed} "
                    f"time(s), still running at its next interval {skipped} time(s); FAULT entered {faults} time(s), "
                    f"{cuts[pair.key][balancer.name]} of them by the bench's link cuts."
                )
    failover_notes(case, pairs)
    return case


def failover_notes(case: CaseResult, pairs: list[Pair]) -> None:
    for pair in pairs:
        runs = case.runs.get(pair.key, [])
        if not runs:
            continue
        times = [run["failover"] for run in runs]
        kept = sum(run["kept"] for run in runs)
        clients = sum(run["clients"] for run in runs)
        whole = sum(1 for run in runs if run["kept"] == run["clients"])
        case.notes.append(
            f"{pair.label}: failover median {statistics.median(times):.2f} s, max {max(times):.2f} s, "
            f"min {min(times):.2f} s over {len(runs)} failovers; clients kept {kept:.0f}/{clients:.0f} "
            f"({whole}/{len(runs)} rounds with every client kept)."
        )
    pacslb = case.runs.get("pacslb", [])
    if pacslb:
        median = statistics.median(run["failover"] for run in pacslb)
        every = all(run["kept"] == run["clients"] for run in pacslb)
        case.notes.append(
            f"Goal for the pacslb pair: the virtual IP answers within 1 s (median): "
            f"{'met' if median <= 1.0 else 'MISSED'} ({median:.2f} s); every client keeps its node: "
            f"{'met' if every else 'MISSED'}."
        )
    cut_ms = [run["cut_cmd_ms"] for runs in case.runs.values() for run in runs]
    lag_ms = [run["probe_lag_ms"] for runs in case.runs.values() for run in runs]
    if cut_ms:
        case.notes.append(
            f"The time counts from just before the bench ran `ip link set eth0 down` (that command took "
            f"{statistics.median(cut_ms):.0f} ms, median) to the probe's first complete answer; the probe started "
            f"{statistics.median(lag_ms):.1f} ms (median) after the command returned, a new connection every "
            f"{PROBE_INTERVAL * 1000:.0f} ms."
        )
    case.comparisons = [
        Comparison("pacslb pair / HAProxy pair, advert 200 ms both", "failover", "pacslb", "haproxy"),
        Comparison("pacslb pair (200 ms) / HAProxy pair, advert 1 s", "failover", "pacslb", "haproxy-1s"),
        Comparison("pacslb pair - HAProxy pair, clients kept (200 ms)", "kept", "pacslb", "haproxy", kind="diff"),
    ]


# -- the store case ------------------------------------------------------------------------------------------

STORE_METRICS = [
    Metric("rate", "conn/s", digits=0),
    Metric("cpu_us", "pacslb CPU µs per connection", higher_is_better=False, digits=0),
    Metric("redis_cpu_pct", "redis-server CPU %", higher_is_better=False, digits=0),
]


def api_status(port: int) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/status", headers={"X-Pacslb-Request": "1"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())


def run_store(ctx: Context) -> CaseResult:
    seconds = ctx.duration(5.0, 2.0)
    case = CaseResult(
        "store",
        f"(f) the Redis store's cost on new connections: pacslb mode tcp, source_ip persistence, "
        f"{STORE_SOURCES} client addresses, concurrency {STORE_CONCURRENCY}, {seconds:g} s per run, two nginx nodes",
        list(STORE_METRICS),
    )
    if not Path(REDIS).exists():
        case.error = f"{REDIS} is missing: run `sh bench/install.sh`"
        return case
    nodes = [Node("n1", ctx.ports.take()), Node("n2", ctx.ports.take())]
    for node in nodes:
        peers.start_nginx(ctx.procs, node, ctx.workdir)
    redis_port = ctx.ports.take()
    redis = ctx.procs.start(
        "redis",
        [REDIS, "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--appendonly", "no",
         "--dir", str(ctx.workdir)],
    )  # fmt: skip
    ctx.procs.wait_listening(redis, redis_port)
    sizes: list[tuple[str, int | None]] = [("1", 1), ("def", None)] if ctx.caps.workers else [("def", None)]
    subjects: list[Subject] = []
    admin_ports: dict[str, int] = {}
    for store in ("memory", "redis"):
        for size, workers in sizes:
            key = f"{store}@{size}"
            label = f"pacslb, {store} store, " + (
                f"workers: {workers}" if workers else f"default workers ({ctx.cores})"
            )
            subjects.append(Subject(key, label, "pacslb"))
            case.subjects[key] = label
            admin_ports[key] = ctx.ports.take()
    order = [f"{store}@{size}" for size, _ in sizes for store in ("memory", "redis")]
    subjects.sort(key=lambda s: order.index(s.key))
    for subject in subjects:
        store, size = subject.key.split("@")
        subject.port = ctx.ports.take()
        config = peers.pacslb_config(
            subject.port, nodes, mode="tcp", workers=dict(sizes)[size],
            persistence={"type": "source_ip", "timeout": "30m"},
        )  # fmt: skip
        config["admin"] = {"listen": f"127.0.0.1:{admin_ports[subject.key]}"}
        config["cluster"] = {"node": subject.key.replace("@", "-")}
        if store == "redis":
            config["cluster"]["store"] = f"redis://127.0.0.1:{redis_port}/0"
        subject.proc = peers.start_pacslb(ctx.procs, subject.key.replace("@", "-"), config, subject.port, ctx.workdir)
        if store == "redis":
            wait_for(
                lambda p=admin_ports[subject.key]: api_status(p)["cluster"]["store"].get("synced"),
                30,
                f"{subject.label} to sync with Redis",
            )
    expect: list[str] = []
    for node in nodes:
        expect += ["--expect", peers.nginx_body(node.name)]

    def measure(subject: Subject) -> dict[str, float]:
        assert subject.proc is not None
        redis_before, pacslb_before = tree_cpu_seconds(redis.pid), tree_cpu_seconds(subject.proc.pid)
        wall = time.monotonic()
        result = run_loadgen(
            "http10",
            [subject.port],
            seconds,
            ["--concurrency", str(STORE_CONCURRENCY), "--sources", str(STORE_SOURCES), *expect],
        )
        redis_after, pacslb_after = tree_cpu_seconds(redis.pid), tree_cpu_seconds(subject.proc.pid)
        wall = time.monotonic() - wall
        errors = sum(result["errors"].values())
        return {
            "rate": float(result["rate"]),
            "cpu_us": 1e6 * (sum(pacslb_after) - sum(pacslb_before)) / max(1, result["ok"]),
            "errors": float(errors),
            "redis_cpu_pct": 100 * (sum(redis_after) - sum(redis_before)) / wall,
        }

    def describe(values: dict[str, float]) -> str:
        text = f"{values['rate']:,.0f}/s, {values['cpu_us']:.0f} µs CPU per connection, "
        text += f"redis-server CPU {values['redis_cpu_pct']:.0f}%"
        return text + (f", {values['errors']:.0f} errors" if values.get("errors") else "")

    measure_all(ctx, case, subjects, measure, describe=describe)
    for subject in subjects:
        if not subject.key.startswith("redis"):
            continue
        try:
            store = api_status(admin_ports[subject.key])["cluster"]["store"]
        except (OSError, ValueError, KeyError) as exc:
            case.notes.append(f"{subject.label}: status not read: {exc}")
            continue
        case.notes.append(
            f"{subject.label}: store after the runs: connected {store.get('connected')}, synced "
            f"{store.get('synced')}, {store.get('written', 0):,} bindings written, {store.get('pending', 0)} pending."
        )
    for subject in subjects:
        total = sum(run.get("errors", 0.0) for run in case.runs.get(subject.key, []))
        if total:
            case.notes.append(f"{subject.label}: {total:.0f} failed connections over all rounds (not in the rate)")
    case.comparisons = [
        Comparison("redis store / memory store, default workers", "rate", "redis@def", "memory@def",
                   report.Target(">=", 0.95), "5%"),
    ]  # fmt: skip
    if ctx.caps.workers:
        case.comparisons.append(
            Comparison("redis store / memory store, workers: 1", "rate", "redis@1", "memory@1",
                       report.Target(">=", 0.95), "5%")
        )  # fmt: skip
    for size, _ in sizes:
        case.comparisons.append(
            Comparison(f"redis store / memory store, pacslb CPU per connection, @{size}", "cpu_us",
                       f"redis@{size}", f"memory@{size}")
        )  # fmt: skip
    case.notes.append(
        "The rate is bounded by whatever is busiest: while pacslb's CPU (balancer CPU %) is well under 100% of a "
        "core, the Python client or the machine bounds it, and the store's cost shows in pacslb's CPU per "
        "connection rather than in the rate."
    )
    case.notes.append(
        "redis-server runs on the same 2 cores as pacslb, the client and the nodes (in a deployment it is on "
        "another host): its CPU is shown, and what it takes is not free for the others here."
    )
    return case


# -- standalone ----------------------------------------------------------------------------------------------


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: processes stopped, namespaces deleted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/ha.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="failovers per pair (default 10)")
    parser.add_argument("--store-rounds", type=int, default=5, help="rounds of the store case (default 5)")
    parser.add_argument("--cases", default="ha,store", help="ha, store or both (default ha,store)")
    parser.add_argument("--quick", action="store_true", help="2 s runs in the store case instead of 5 s")
    parser.add_argument("--no-slow-advert", action="store_true", help="leave out the HAProxy pair at advert 1 s")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs of the run")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in cases if c not in ("ha", "store")]:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    raise_nofile()
    command = "python bench/ha.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="pacslb-bench-ha-"))
    results: list[CaseResult] = []
    try:
        caps = peers.probe_capabilities(workdir)
        described = machine.describe(caps)
        info = {key: described[key] for key in ("cores", "kernel", "python", "pacslb", "haproxy", "nginx")}
        info |= {
            "keepalived": machine._first_line([KEEPALIVED, "--version"], stderr=True),
            "redis-server": machine._first_line([REDIS, "--version"]),
            "load average at start": machine.loadavg(),
        }
        for name in cases:
            started = time.monotonic()
            with Processes(workdir / name / "logs") as procs:
                ctx = Context(
                    procs=procs,
                    ports=Ports(),
                    workdir=workdir / name,
                    cache=ROOT / "bench" / ".cache",
                    caps=caps,
                    cores=machine.usable_cores(),
                    repeat=args.rounds if name == "ha" else args.store_rounds,
                    quick=args.quick,
                    http_mode="auto",
                )
                try:
                    result = run_failover(ctx, slow_advert=not args.no_slow_advert) if name == "ha" else run_store(ctx)
                except (BenchError, OSError, ValueError, KeyError) as exc:
                    result = CaseResult(name, name, [], error=f"{type(exc).__name__}: {exc}")
            result.seconds = time.monotonic() - started
            results.append(result)
        info["load average at end"] = machine.loadavg()
        info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.full_markdown(info, results, command))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = ROOT / "bench" / "results" / f"ha-{stamp}.json"
    report.write_json(path, info, results, command)
    print(f"bench: raw figures in {path.relative_to(ROOT)}", file=sys.stderr)
    if args.keep_workdir:
        print(f"bench: configs and logs kept in {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
