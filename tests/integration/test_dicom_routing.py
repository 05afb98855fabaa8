"""Persistence by calling AE title and routing rules in ``mode: dicom``, with real Orthanc nodes.

Several modalities often sit behind one NAT address: persistence by source IP would pin them all to one
node. Here pynetdicom clients with chosen calling AE titles connect from chosen loopback addresses
(127.0.0.2, 127.0.3.5, ...) and the tests check where each association went: in Orthanc (which node
stored each modality's instances) and in pacslb's ``assoc`` lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import peers
import pytest
from peers import LogEvent, OrthancNode, PacslbProcess, Study

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[OrthancNode]]:
    """pacs1, pacs2, pacs3, shared by this module's tests (each test stores its own study)."""
    cluster = peers.OrthancCluster(tmp_path_factory.mktemp("orthanc"))
    try:
        yield cluster.start(3)
    finally:
        cluster.discard()


def start(pacslb: PacslbFactory, nodes: list[OrthancNode], **kwargs: Any) -> tuple[PacslbProcess, int]:
    port = peers.free_port()
    spec = peers.dicom_service(port, nodes, balance="roundrobin", **kwargs)
    return pacslb(peers.config_text({"dicom": spec})), port


def assoc_line(lb: PacslbProcess, client: str) -> LogEvent:
    """The ``assoc`` line of the association from this exact client address (ip:port)."""
    return lb.wait_event("assoc", timeout=5.0, client=client)


def store_as(port: int, calling_ae: str, source_ip: str, datasets: list[Any]) -> str:
    """One association storing ``datasets``; returns the client address."""
    with peers.DicomClient(port, source_ip, calling_ae=calling_ae) as client:
        address = client.local_address
        assert client.store(datasets) == [0] * len(datasets), f"C-STORE as {calling_ae} from {address}"
    return address


def node_of(nodes: list[OrthancNode], sop_uids: set[str]) -> str:
    """The one node that stores all of ``sop_uids``; fails if they are spread or missing."""
    holders = {node.name: node.sop_instance_uids() & sop_uids for node in nodes}
    with_any = {name: len(uids) for name, uids in holders.items() if uids}
    assert len(with_any) == 1 and sum(with_any.values()) == len(sop_uids), f"instances spread as {with_any}"
    return next(iter(with_any))


def test_calling_ae_persistence_balances_modalities_behind_one_address_independently(
    nodes: list[OrthancNode], pacslb: PacslbFactory, study: Study
) -> None:
    lb, port = start(pacslb, nodes, persistence={"type": "calling_ae", "timeout": "5m"})
    titles = [f"CT0{i}" for i in range(1, 7)]
    datasets = study.datasets()
    sent: dict[str, list[str]] = {ae: [] for ae in titles}
    clients: dict[str, list[str]] = {ae: [] for ae in titles}

    # Six modalities behind one address (127.0.0.2), three associations each, interleaved.
    for rnd in range(3):
        for i, ae in enumerate(titles):
            ds = datasets[rnd * 6 + i]
            clients[ae].append(store_as(port, ae, "127.0.0.2", [ds]))
            sent[ae].append(str(ds.SOPInstanceUID))

    node_by_ae = {ae: node_of(nodes, set(sent[ae])) for ae in titles}  # each AE's instances on one node
    assert len(set(node_by_ae.values())) == 3, f"one address, yet not balanced per AE title: {node_by_ae}"
    for ae in titles:
        lines = [assoc_line(lb, client) for client in clients[ae]]
        assert [line.get("calling") for line in lines] == [ae] * 3
        assert [line.get("server") for line in lines] == [node_by_ae[ae]] * 3, [line.line for line in lines]
        assert [line.get("rule") for line in lines] == ["balance", "persistence", "persistence"]

    # The key is the AE title alone: CT01 from another address goes to CT01's node.
    moved = peers.echo_as(port, "CT01", source_ip="127.0.0.3")
    line = assoc_line(lb, moved)
    assert (line.get("server"), line.get("rule")) == (node_by_ae["CT01"], "persistence"), line.line


def test_calling_ae_plus_source_ip_keeps_one_ae_from_two_addresses_apart(
    nodes: list[OrthancNode], pacslb: PacslbFactory
) -> None:
    lb, port = start(pacslb, nodes[:2], persistence={"type": "calling_ae+source_ip", "timeout": "5m"})

    first = {ip: assoc_line(lb, peers.echo_as(port, "US01", ip)) for ip in ("127.0.0.2", "127.0.0.3")}

    # Roundrobin over two nodes: the same AE title from a second address is a new client, on the other node.
    assert first["127.0.0.2"].get("server") != first["127.0.0.3"].get("server"), [e.line for e in first.values()]
    assert {e.get("rule") for e in first.values()} == {"balance"}
    for _ in range(2):
        for ip in ("127.0.0.2", "127.0.0.3"):
            again = assoc_line(lb, peers.echo_as(port, "US01", ip))
            assert again.get("server") == first[ip].get("server"), again.line
            assert again.get("rule") == "persistence", again.line
    # Another AE title from a known address is also a new client.
    other = assoc_line(lb, peers.echo_as(port, "US02", "127.0.0.2"))
    assert other.get("rule") == "balance", other.line


def test_route_by_calling_ae_sends_every_mr_association_to_pacs2(
    nodes: list[OrthancNode], pacslb: PacslbFactory, study: Study
) -> None:
    lb, port = start(pacslb, nodes, dicom={"routes": [{"calling_ae": "MR*", "servers": ["pacs2"]}]})
    datasets = study.datasets()
    mr_uids: set[str] = set()
    mr_clients, ct_clients = [], []

    for rnd in range(3):
        for i, ae in enumerate(("MR01", "MR02")):
            ds = datasets[rnd * 2 + i]
            mr_clients.append(store_as(port, ae, "127.0.0.2", [ds]))
            mr_uids.add(str(ds.SOPInstanceUID))
        for ae in ("CT11", "CT12"):
            ct_clients.append(peers.echo_as(port, ae, "127.0.0.2"))

    assert node_of(nodes, mr_uids) == "pacs2"
    mr_lines = [assoc_line(lb, client) for client in mr_clients]
    assert {line.get("server") for line in mr_lines} == {"pacs2"}, [line.line for line in mr_lines]
    ct_servers = [assoc_line(lb, client).get("server") for client in ct_clients]
    assert len(set(ct_servers)) > 1, f"associations no route matched should spread over every node: {ct_servers}"


def test_a_route_wins_over_a_persistence_entry_for_another_node(
    nodes: list[OrthancNode], pacslb: PacslbFactory
) -> None:
    routes = [{"calling_ae": "MR*", "servers": ["pacs2"]}, {"calling_ae": "CT*", "servers": ["pacs1"]}]
    lb, port = start(pacslb, nodes, persistence={"type": "source_ip", "timeout": "5m"}, dicom={"routes": routes})

    ct = assoc_line(lb, peers.echo_as(port, "CT21", "127.0.0.2"))  # pins 127.0.0.2 to pacs1
    mr = assoc_line(lb, peers.echo_as(port, "MR21", "127.0.0.2"))  # same address, but MR goes to pacs2

    assert ct.get("server") == "pacs1", ct.line
    assert mr.get("server") == "pacs2", f"the route must win over the source-IP entry: {mr.line}"


def test_route_by_source_network_and_first_match_wins(nodes: list[OrthancNode], pacslb: PacslbFactory) -> None:
    routes = [
        {"calling_ae": "MR*", "servers": ["pacs2"]},
        {"source": "127.0.3.0/24", "servers": ["pacs3"]},
        {"called_ae": "ARCHIVE", "servers": ["pacs1"]},
    ]
    lb, port = start(pacslb, nodes, dicom={"routes": routes})

    ward = [assoc_line(lb, peers.echo_as(port, "CR01", ip)) for ip in ("127.0.3.5", "127.0.3.9", "127.0.3.5")]
    outside = [assoc_line(lb, peers.echo_as(port, "CR01", f"127.0.4.{i}")) for i in range(2, 6)]
    mr_in_ward = assoc_line(lb, peers.echo_as(port, "MR05", "127.0.3.5"))
    archive = [assoc_line(lb, peers.echo_as(port, "CR02", "127.0.0.2", called_ae="ARCHIVE")) for _ in range(3)]

    assert {e.get("server") for e in ward} == {"pacs3"}, [e.line for e in ward]
    assert len({e.get("server") for e in outside}) > 1, [e.line for e in outside]
    assert mr_in_ward.get("server") == "pacs2", f"the MR route comes first: {mr_in_ward.line}"
    assert {e.get("server") for e in archive} == {"pacs1"}, [e.line for e in archive]
