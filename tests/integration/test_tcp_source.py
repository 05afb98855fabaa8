"""The service's ``source`` address: connections to the nodes come from it, and it does not cost a local port
per connection across all the nodes.

``bind((source, 0))`` alone makes the kernel pick the local port at bind time, for no destination in
particular: every connection from ``source`` then holds a port of its own among all the nodes (and keeps it
through TIME_WAIT). pacslb asks for the port at connect time instead (IP_BIND_ADDRESS_NO_PORT), as HAProxy
does for a ``source`` without a port, so each node has the whole local port range. The test makes that
visible in a network namespace of its own whose local port range is four ports: six connections held through
pacslb to two nodes need six node connections from ``source``, which fit only when ports are chosen per node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ha"))
import netns  # tests/ha's namespace helpers: a lone namespace, and the sweep of what a killed run left

#: The namespace's local port range: four ports, fewer than the connections the test holds.
PORT_RANGE = "40000 40003"
HELD = 6
NODE_PORTS = (21001, 21002)
LISTEN_PORT = 21000
#: Every step in the namespace is local and quick; this bounds a stuck one.
STEP_TIMEOUT = 30.0

# A node that greets each connection with its name and holds it until the peer closes; and a client that
# opens HELD connections from explicit ports (outside the four-port range, which only pacslb's connections
# to the nodes use), reads each greeting, and prints what each got (a name, or the error) as JSON.
HELPER = textwrap.dedent(
    """
    import json, selectors, socket, sys
    role = sys.argv[1]
    if role == "nodes":
        sel = selectors.DefaultSelector()
        for name, port in zip(("n1", "n2"), map(int, sys.argv[2:4])):
            lsock = socket.socket(); lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(("127.0.0.1", port)); lsock.listen(64)
            sel.register(lsock, selectors.EVENT_READ, name)
        print("listening", flush=True)
        while True:
            for key, _ in sel.select():
                if key.data in ("n1", "n2"):
                    conn, _ = key.fileobj.accept()
                    conn.sendall(key.data.encode())
                    sel.register(conn, selectors.EVENT_READ, "conn")
                elif not key.fileobj.recv(1024):
                    sel.unregister(key.fileobj); key.fileobj.close()
    else:
        port, count = int(sys.argv[2]), int(sys.argv[3])
        got, socks = [], []
        for i in range(count):
            sock = socket.socket(); sock.settimeout(10)
            sock.bind(("127.0.0.1", 50000 + i))
            try:
                sock.connect(("127.0.0.1", port))
                got.append(sock.recv(16).decode() or "closed")
            except OSError as exc:
                got.append(type(exc).__name__)
            socks.append(sock)
        print(json.dumps(got), flush=True)
    """
)


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace with loopback up and a local port range of four ports; deleted after the test."""
    why = netns.available()
    if why is not None:
        pytest.skip(f"a network namespace of the test's own: {why}")
    netns.sweep()
    with netns.isolated("source") as name:
        write_range = f"echo '{PORT_RANGE}' > /proc/sys/net/ipv4/ip_local_port_range"
        subprocess.run([netns.IP, "netns", "exec", name, "sh", "-c", write_range], check=True, timeout=STEP_TIMEOUT)
        yield name


def test_connections_from_source_take_their_local_ports_per_node(namespace: str, tmp_path: Path) -> None:
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    in_ns = [netns.IP, "netns", "exec", namespace]
    nodes = subprocess.Popen(
        [*in_ns, sys.executable, str(helper), "nodes", *map(str, NODE_PORTS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert nodes.stdout is not None and nodes.stdout.readline().strip() == "listening"
        servers = {"n1": f"127.0.0.1:{NODE_PORTS[0]}", "n2": f"127.0.0.1:{NODE_PORTS[1]}"}
        spec = peers.service(
            LISTEN_PORT,
            servers,
            check={"type": "none"},
            source="127.0.0.1",
            limits={"client_maxconn": "none", "client_rate": "none"},
        )
        lb = peers.PacslbProcess(tmp_path / "pacslb", peers.config_text({"held": spec}), prefix=in_ns).start()
        try:
            done = subprocess.run(
                [*in_ns, sys.executable, str(helper), "client", str(LISTEN_PORT), str(HELD)],
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT,
            )
            assert done.returncode == 0 and done.stdout.strip(), f"the client failed: {done.stderr}"
            got = json.loads(done.stdout)
            assert sorted(got) == ["n1"] * (HELD // 2) + ["n2"] * (HELD // 2), (
                f"each of {HELD} connections should reach a node, spread over both: {got}\n{lb.log()}"
            )
            assert not lb.events("connect_failed"), lb.log()
        finally:
            lb.stop()
    finally:
        nodes.kill()
        nodes.wait(STEP_TIMEOUT)
