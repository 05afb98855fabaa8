"""Real peers for the integration tests: Orthanc nodes, dcmtk tools, pynetdicom clients and pacslb itself.

Theory of operation
-------------------
Every test builds its own little hospital on loopback: a few Orthanc processes (real PACS nodes, each with
its own HTTP and DICOM port, AE title, storage folder and the worklist plugin), a pacslb process started
with an inline config on a free port, and clients that a user would use: dcmtk's ``echoscu``, ``storescu``
and ``findscu`` (which always connect from 127.0.0.1) and pynetdicom associations bound to other
127.x.y.z addresses (for source-IP persistence, since dcmtk cannot choose its source address).

What a test asserts is what a user would look at: Orthanc's REST API (which node holds which SOP
instances), what the client tool printed and its exit code, and pacslb's log lines (parsed into
:class:`LogEvent`, never matched as whole strings).

Every wait here is bounded and every process started here is stopped by PID (SIGTERM, then SIGKILL after
a bound) and reaped; :func:`reap_all` is the last resort at the end of the session.

Note on PATH: pynetdicom installs Python scripts named ``echoscu``, ``storescu`` and ``findscu`` that
shadow dcmtk's binaries when the Python ``bin`` folder comes first on PATH. The tests therefore call
dcmtk's tools by their Debian path (:data:`DCMTK_BIN`), never by bare name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[2]
DCMTK_BIN = Path("/usr/bin")  # Debian's dcmtk; see the note on PATH above
ORTHANC_BIN = Path("/usr/sbin/Orthanc")
WORKLIST_PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")
INSTALL_HINT = "run tests/peers/install.sh as root (it installs dcmtk and orthanc with apt)"

#: Orthanc answers GET /system within 0.1 s of starting; 15 s allows for a loaded CI machine.
ORTHANC_START_TIMEOUT = 15.0
#: Orthanc takes about 3 s to exit after SIGTERM (peers.md); past 10 s it is killed.
ORTHANC_STOP_TIMEOUT = 10.0
#: pacslb prints its ``ready`` line once every listener is bound; it should take well under a second.
PACSLB_READY_TIMEOUT = 15.0
#: SIGTERM at teardown waits at most this long (shutdown_grace in test configs is shorter) before SIGKILL.
PACSLB_STOP_TIMEOUT = 10.0
#: dcmtk's own network timeouts (-to/-ta/-td), so that no client tool waits forever on a broken peer.
DCMTK_NET_TIMEOUT = 10
#: pynetdicom clients: bound on connect, ACSE and DIMSE waits.
PYNETDICOM_TIMEOUT = 10.0

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"

_started: list[subprocess.Popen[bytes]] = []
_handed_ports: set[int] = set()


# --------------------------------------------------------------------------------------------- basics


def missing_peers() -> list[str]:
    """The files of the real peers that are not installed on this machine."""
    needed = [DCMTK_BIN / t for t in ("echoscu", "storescu", "findscu")] + [ORTHANC_BIN, WORKLIST_PLUGIN]
    return [str(p) for p in needed if not p.exists()]


def require_peers() -> None:
    """Fail (never skip) the calling test when dcmtk or Orthanc is missing."""
    missing = missing_peers()
    if missing:
        pytest.fail(f"real peers missing ({', '.join(missing)}): {INSTALL_HINT}", pytrace=False)


def _port_range() -> range:
    """Where test ports come from: just below the kernel's ephemeral range, so that no outgoing connection
    (a browser's, a check's, a relay's) can be given a test port as its local port between the moment a
    test picks it and the moment something listens on it; a port from the ephemeral range would be."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


_ports = _port_range()
_next_port = [os.getpid() % len(_ports)]  # where this session starts looking


def free_port() -> int:
    """A TCP port that is free on every local address (Orthanc binds all addresses), from below the
    ephemeral range (see :func:`_port_range`).

    The port is closed again before use, so another process could take it in between; handing each port
    out at most once per session keeps the tests from racing each other.
    """
    for _ in range(len(_ports)):
        port = _ports[_next_port[0] % len(_ports)]
        _next_port[0] += 1
        if port in _handed_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_ports.add(port)
        return port
    raise RuntimeError("no free TCP port found")


T = TypeVar("T")


def wait_for(predicate: Callable[[], T | bool | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy, at most ``timeout`` seconds; fail otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f} s waiting for {what}", pytrace=False)
        time.sleep(interval)


def tcp_connect_refused(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing accepts connections on host:port any more."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM) -> int:
    """Signal one child process by PID, wait for it (reaping it), SIGKILL it past ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc in _started:
        _started.remove(proc)
    return proc.returncode


def _popen(args: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    _started.append(proc)
    return proc


def reap_all() -> list[str]:
    """Kill and reap any process started here that a test left behind; returns what it had to kill."""
    leftovers = []
    for proc in list(_started):
        if proc.poll() is None:
            leftovers.append(" ".join(str(a) for a in proc.args))  # type: ignore[union-attr]
        _stop_process(proc, timeout=5.0, sig=signal.SIGKILL)
    return leftovers


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


# ------------------------------------------------------------------------------------------- Orthanc


@dataclass
class OrthancNode:
    """One Orthanc process: a PACS node with DICOM, REST and the modality worklist plugin."""

    name: str  # pacs1, the server name used in pacslb configs
    http_port: int
    dicom_port: int
    root: Path
    worklists: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more configuration (DICOM TLS, ...)

    @property
    def aet(self) -> str:
        return self.name.upper()

    @property
    def address(self) -> str:
        """The DICOM address as pacslb's config writes it."""
        return f"127.0.0.1:{self.dicom_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def config(self) -> dict[str, Any]:
        storage = self.root / "storage"
        return {
            "Name": self.name,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowFindWorklist": True,
            "UnknownSopClassAccepted": True,
            "Plugins": [str(WORKLIST_PLUGIN)],
            "Worklists": {"Enable": True, "Database": str(self.worklists)},
            **self.extra,
        }

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process (again, on the same ports and folders) and wait until its REST API answers."""
        assert not self.running(), f"{self.name} is already running"
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=1))
        self.proc = _popen([str(ORTHANC_BIN), str(config)], self.log_path, cwd=self.root)

        def answers() -> bool:
            if not self.running():
                pytest.fail(f"Orthanc {self.name} exited at start; its log:\n{_tail(self.log_path)}")
            try:
                return httpx.get(f"{self.url}/system", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, ORTHANC_START_TIMEOUT, f"Orthanc {self.name} to answer GET /system")
        # The DICOM port opens independently of the HTTP one; wait for it too.
        wait_for(
            lambda: not tcp_connect_refused(self.dicom_port),
            ORTHANC_START_TIMEOUT,
            f"Orthanc {self.name} DICOM port {self.dicom_port}",
        )

    def signal_stop(self) -> None:
        """Send SIGTERM without waiting (to stop several nodes in parallel; then call :meth:`stop`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM and wait for the PID (Orthanc needs about 3 s), SIGKILL past the bound."""
        if self.proc is not None:
            _stop_process(self.proc, ORTHANC_STOP_TIMEOUT)
            self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, then reap it so its ports are free for :meth:`start`."""
        if self.proc is not None:
            _stop_process(self.proc, 5.0, sig=signal.SIGKILL)
            self.proc = None

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10.0)
        response.raise_for_status()
        return response.json()

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance this node stores."""
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")}

    def study_instance_uids(self) -> set[str]:
        return {s["MainDicomTags"]["StudyInstanceUID"] for s in self.get("/studies?expand")}


class OrthancCluster:
    """The Orthanc nodes of one test, sharing one worklist folder; stopped together at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.worklists = root / "worklists"
        self.nodes: list[OrthancNode] = []

    def start(self, count: int) -> list[OrthancNode]:
        """Start ``count`` more nodes (named pacs1, pacs2, ... with AE titles PACS1, PACS2, ...)."""
        require_peers()
        if not self.worklists.exists():
            self.worklists.mkdir(parents=True)
            write_worklist_item(self.worklists / "ct1.wl")
        new = []
        for _ in range(count):
            name = f"pacs{len(self.nodes) + 1}"
            node = OrthancNode(name, free_port(), free_port(), self.root / name, self.worklists)
            self.nodes.append(node)
            new.append(node)
        try:
            for node in new:
                node.start()
        except BaseException:
            self.stop_all()
            raise
        return new

    def stop_all(self) -> None:
        for node in self.nodes:
            node.signal_stop()
        for node in self.nodes:
            node.stop()

    def discard(self) -> None:
        """SIGKILL every node and reap it: for a teardown, whose folders go with it (a graceful stop costs
        Orthanc about 3 s, and nothing of its index is read again)."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
        for node in self.nodes:
            node.kill()


# ---------------------------------------------------------------------------------------- DICOM data

#: Patient of the worklist item every Orthanc node serves.
WORKLIST_PATIENT = "PACSLB^WORKLIST"
WORKLIST_ACCESSION = "PACSLB0001"


def write_worklist_item(path: Path) -> None:
    """Write one CT modality-worklist item (PS3.4 K.6) as a DICOM file Orthanc's worklist plugin serves."""
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = "CTSCANNER"
    step.ScheduledProcedureStepStartDate = time.strftime("%Y%m%d")
    step.ScheduledProcedureStepStartTime = "080000"
    step.ScheduledPerformingPhysicianName = "SMITH^JANE"
    step.ScheduledProcedureStepDescription = "CT CHEST"
    step.ScheduledProcedureStepID = "SPS0001"

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = WORKLIST_ACCESSION
    ds.PatientName = WORKLIST_PATIENT
    ds.PatientID = "PLB0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.RequestedProcedureID = "RP0001"
    ds.RequestedProcedureDescription = "CT CHEST"
    ds.ScheduledProcedureStepSequence = [step]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.31")  # Modality Worklist Information Model - FIND
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


@dataclass(frozen=True)
class Study:
    """A generated CT study on disk: one series of distinct instances."""

    directory: Path
    study_uid: str
    series_uid: str
    sop_uids: frozenset[str]
    files: tuple[Path, ...]

    def datasets(self) -> list[Dataset]:
        return [pydicom.dcmread(f) for f in self.files]


def make_study(directory: Path, count: int = 20, patient_name: str = "PACSLB^TEST") -> Study:
    """Write ``count`` distinct CT instances made from pydicom's bundled CT_small.dcm.

    Each instance gets a fresh SOP Instance UID; all share one fresh study and series, so a test can
    find the study by its UID and check that every instance arrived.
    """
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm", download=False)  # download=True would try the network
    assert source is not None, "pydicom's bundled CT_small.dcm is missing"
    template = pydicom.dcmread(source)
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    sop_uids, files = [], []
    for number in range(1, count + 1):
        ds = template.copy()
        ds.PatientName = patient_name
        ds.PatientID = "PLBTEST"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        path = directory / f"ct{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(ds.SOPInstanceUID)
        files.append(path)
    return Study(directory, study_uid, series_uid, frozenset(sop_uids), tuple(files))


def read_sop_uid(path: Path) -> str:
    """The SOP Instance UID of a DICOM file."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --------------------------------------------------------------------------------------------- dcmtk


@dataclass(frozen=True, repr=False)
class ToolResult:
    """What a dcmtk tool did: its command, exit code, everything it printed, and how long it took."""

    args: tuple[str, ...]
    returncode: int
    output: str
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __str__(self) -> str:
        return f"$ {' '.join(self.args)}\n(exit {self.returncode} after {self.elapsed:.2f} s)\n{self.output}"

    __repr__ = __str__  # pytest shows an assertion's message object by its repr


def dcmtk(tool: str, *args: str, timeout: float = 30.0) -> ToolResult:
    """Run one dcmtk tool with a bound on its run time; stdout and stderr together in ``output``."""
    require_peers()
    argv = (str(DCMTK_BIN / tool), *args)
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed and reaped it
        out = (exc.stdout or b"") + (exc.stderr or b"")
        pytest.fail(f"{tool} did not finish within {timeout} s:\n{out.decode(errors='replace')}")
    output = (done.stdout + done.stderr).decode(errors="replace")
    return ToolResult(argv, done.returncode, output, time.monotonic() - started)


def _net_timeouts() -> tuple[str, ...]:
    t = str(DCMTK_NET_TIMEOUT)
    return ("-to", t, "-ta", t, "-td", t)


def echoscu(port: int, called: str = "ANY-SCP", calling: str = "ECHOSCU", host: str = "127.0.0.1") -> ToolResult:
    return dcmtk("echoscu", "-v", *_net_timeouts(), "-aet", calling, "-aec", called, host, str(port))


def storescu(
    port: int, path: Path, called: str = "ANY-SCP", calling: str = "STORESCU", host: str = "127.0.0.1"
) -> ToolResult:
    """Send a file, or a whole folder in one association (+sd +r)."""
    scan = ("+sd", "+r") if path.is_dir() else ()
    return dcmtk(
        "storescu", "-v", *_net_timeouts(), "-aet", calling, "-aec", called, *scan,
        host, str(port), str(path), timeout=60.0,
    )  # fmt: skip


def findscu_study(port: int, study_uid: str, called: str = "ANY-SCP", host: str = "127.0.0.1") -> ToolResult:
    """A study-root C-FIND for one study (-v prints each response's dataset)."""
    return dcmtk(
        "findscu", "-v", *_net_timeouts(), "-S", "-aet", "FINDSCU", "-aec", called,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "-k", "PatientName",
        host, str(port),
    )  # fmt: skip


def findscu_worklist(port: int, called: str = "ANY-SCP", host: str = "127.0.0.1") -> ToolResult:
    """A modality worklist query for CT procedure steps."""
    return dcmtk(
        "findscu", "-v", *_net_timeouts(), "-W", "-aet", "CTSCANNER", "-aec", called,
        "-k", "PatientName", "-k", "AccessionNumber",
        "-k", "ScheduledProcedureStepSequence[0].Modality=CT", host, str(port),
    )  # fmt: skip


def count_responses(result: ToolResult) -> int:
    """How many matches a findscu run reported (one 'Find Response: N (Pending)' line each)."""
    return len(re.findall(r"Find Response: \d+ \(Pending\)", result.output))


# ---------------------------------------------------------------------------------------- pynetdicom


class DicomClient:
    """A pynetdicom association from a chosen source address (e.g. 127.0.0.2) through pacslb.

    Used as a context manager: the association is requested on entry and released on exit. pynetdicom
    runs its own threads, so this works from a plain synchronous test.
    """

    def __init__(
        self,
        port: int,
        source_ip: str = "127.0.0.1",
        *,
        host: str = "127.0.0.1",
        calling_ae: str = "PLBCLIENT",
        called_ae: str = "ANY-SCP",
    ) -> None:
        from pynetdicom import AE

        self.port, self.source_ip, self.host, self.called_ae = port, source_ip, host, called_ae
        self.ae = AE(ae_title=calling_ae)
        self.ae.acse_timeout = PYNETDICOM_TIMEOUT
        self.ae.dimse_timeout = PYNETDICOM_TIMEOUT
        self.ae.network_timeout = PYNETDICOM_TIMEOUT
        self.ae.connection_timeout = PYNETDICOM_TIMEOUT
        self.ae.add_requested_context(VERIFICATION)
        self.ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        self.assoc: Any = None

    def open(self) -> DicomClient:
        self.assoc = self.ae.associate(self.host, self.port, ae_title=self.called_ae, bind_address=(self.source_ip, 0))
        if not self.assoc.is_established:
            raise AssertionError(
                f"association from {self.source_ip} to {self.host}:{self.port} not established "
                f"(rejected={self.assoc.is_rejected}, aborted={self.assoc.is_aborted})"
            )
        return self

    def __enter__(self) -> DicomClient:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def local_address(self) -> str:
        """``ip:port`` of the client side, as pacslb's conn line names the client."""
        host, port = self.assoc.dul.socket.socket.getsockname()[:2]
        return f"{host}:{port}"

    def echo(self) -> int:
        """C-ECHO; returns the DIMSE status (0 is success), or -1 when no response came."""
        status = self.assoc.send_c_echo()
        return int(status.Status) if status else -1

    def store(self, datasets: Iterable[Dataset]) -> list[int]:
        """C-STORE each dataset; returns the statuses (-1 when no response came)."""
        out = []
        for ds in datasets:
            status = self.assoc.send_c_store(ds)
            out.append(int(status.Status) if status else -1)
        return out

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()


def echo_from(port: int, source_ip: str) -> str:
    """One short association from ``source_ip`` with one C-ECHO; returns the client address used."""
    with DicomClient(port, source_ip) as client:
        address = client.local_address
        status = client.echo()
        assert status == 0, f"C-ECHO from {address} returned status {status:#06x}"
    return address


# -------------------------------------------------------------------------------------------- pacslb

_LINE = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\dT\S+)\s+(?P<level>[a-z]+)\s+(?P<event>\S+)(?:\s+(?P<rest>.*))?$")
_FIELD = re.compile(r'(?P<key>[\w.-]+)=(?P<value>"(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class LogEvent:
    """One pacslb log line: ``<timestamp> <level> <event> key=value ...``."""

    ts: str
    level: str
    event: str
    fields: dict[str, str] = field(default_factory=dict)
    line: str = ""

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)

    def matches(self, event: str | None, criteria: Mapping[str, str | Callable[[str], bool]]) -> bool:
        if event is not None and self.event != event:
            return False
        for key, want in criteria.items():
            have = self.fields.get(key)
            if have is None:
                return False
            if callable(want):
                if not want(have):
                    return False
            elif have != want:
                return False
        return True


def parse_log_line(line: str) -> LogEvent | None:
    """Parse one text log line; quoted values are JSON strings (as pacslb.logs writes them)."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    fields = {}
    for f in _FIELD.finditer(m.group("rest") or ""):
        value = f.group("value")
        if value.startswith('"'):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        fields[f.group("key")] = value
    return LogEvent(m.group("ts"), m.group("level"), m.group("event"), fields, line.rstrip("\n"))


def client_ip(ip: str) -> Callable[[str], bool]:
    """A criterion for :meth:`PacslbProcess.events`: the ``client=`` field comes from this address."""
    return lambda value: value.rsplit(":", 1)[0].strip("[]") == ip


class PacslbProcess:
    """``python -m pacslb run CONFIG`` as a child process, its log on a file the test can read and parse."""

    def __init__(self, workdir: Path, config_text: str, prefix: Sequence[str] = ()) -> None:
        """``prefix``: what runs pacslb (e.g. ``ip netns exec NAME``); it must exec pacslb in its place, so
        that signals reach pacslb."""
        self.workdir = workdir
        self.prefix = tuple(prefix)
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "pacslb.yaml"
        self.log_path = workdir / "pacslb.log"
        self.config_path.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PacslbProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = _popen(
            [*self.prefix, sys.executable, "-m", "pacslb", "run", str(self.config_path)],
            self.log_path,
            cwd=self.workdir,
            env=env,
        )

        deadline = time.monotonic() + PACSLB_READY_TIMEOUT
        while not self.events("ready"):
            if self.proc.poll() is not None:
                pytest.fail(
                    f"pacslb exited with {self.proc.returncode} before it was ready; its log:\n{self.log()}",
                    pytrace=False,
                )
            if time.monotonic() >= deadline:
                self.stop()
                pytest.fail(f"pacslb not ready within {PACSLB_READY_TIMEOUT} s; its log:\n{self.log()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(
        self, event: str | None = None, since: int = 0, **criteria: str | Callable[[str], bool]
    ) -> list[LogEvent]:
        """Parsed log lines of ``event`` (any when None) whose fields match, from event number ``since``."""
        parsed = [e for e in map(parse_log_line, self.log().splitlines()) if e is not None]
        return [e for e in parsed[since:] if e.matches(event, criteria)]

    def mark(self) -> int:
        """The number of log events so far, to look only at what comes after (``since=``)."""
        return len(self.events())

    def wait_event(
        self, event: str, timeout: float, since: int = 0, **criteria: str | Callable[[str], bool]
    ) -> LogEvent:
        """Wait (bounded) for the first log line of ``event`` matching ``criteria``; fail with the log."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(event, since, **criteria)
            if found:
                return found[0]
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"no '{event}' log line matching {criteria} within {timeout} s; pacslb's log:\n{self.log()}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def wait_events(
        self, event: str, count: int, timeout: float, since: int = 0, **criteria: str | Callable[[str], bool]
    ) -> list[LogEvent]:
        """Wait (bounded) until at least ``count`` matching lines of ``event`` are there."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(event, since, **criteria)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"{len(found)} of {count} '{event}' log lines matching {criteria} within {timeout} s; "
                    f"pacslb's log:\n{self.log()}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def send(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"pacslb is not running:\n{self.log()}"
        self.proc.send_signal(sig)

    def reload(self, config_text: str) -> None:
        """Rewrite the config file and send SIGHUP."""
        self.config_path.write_text(config_text)
        self.send(signal.SIGHUP)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        """Wait (bounded) for the process to exit; fail with the log otherwise."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pacslb still running {timeout} s later; its log:\n{self.log()}", pytrace=False)

    def stop(self) -> int | None:
        """SIGTERM, wait up to :data:`PACSLB_STOP_TIMEOUT`, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        return _stop_process(self.proc, PACSLB_STOP_TIMEOUT)


def run_pacslb_cli(*args: str, timeout: float = 30.0) -> ToolResult:
    """Run ``python -m pacslb ARGS`` to completion (e.g. ``check FILE``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    argv = (sys.executable, "-m", "pacslb", *args)
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False)
    output = (done.stdout + done.stderr).decode(errors="replace")
    return ToolResult(argv, done.returncode, output, time.monotonic() - started)


# ---------------------------------------------------------------------------------------- configs


def service(
    listen_port: int,
    servers: Mapping[str, str | Mapping[str, Any]] | Iterable[OrthancNode],
    *,
    balance: str = "roundrobin",
    persistence: Mapping[str, Any] | None = None,
    check: Mapping[str, Any] | None = None,
    timeouts: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One tcp-mode service as a config mapping; quick checks by default so that tests stay short."""
    if not isinstance(servers, Mapping):
        servers = {node.name: node.address for node in servers}
    spec: dict[str, Any] = {
        "listen": f"127.0.0.1:{listen_port}",
        "mode": "tcp",
        "balance": balance,
        "persistence": dict(persistence or {"type": "none"}),
        "check": dict(check or {"type": "tcp", "interval": "300ms", "timeout": "300ms", "rise": 2, "fall": 2}),
        "servers": {k: (v if isinstance(v, str) else dict(v)) for k, v in servers.items()},
    }
    if timeouts:
        spec["timeouts"] = dict(timeouts)
    spec.update(extra)
    return spec


def config_text(services: Mapping[str, Mapping[str, Any]], **top: Any) -> str:
    """A whole config file (YAML) from service mappings and top-level keys such as shutdown_grace."""
    return yaml.safe_dump({"services": dict(services), **top}, sort_keys=False)


# ------------------------------------------------------------------------------------------ mode dicom
#
# Helpers for the dicom-mode tests: configs, raw Upper Layer PDUs (dicom-ul.md has the layouts), pynetdicom
# associations whose rejection a test can read, and in-process nodes that misbehave on purpose.

#: A C-ECHO check quick enough for tests: a node that fails it is down after one check.
DICOM_ECHO_CHECK: dict[str, Any] = {"type": "dicom_echo", "interval": "500ms", "timeout": "500ms", "rise": 1, "fall": 1}

PDU_ASSOCIATE_RQ, PDU_ASSOCIATE_RJ, PDU_P_DATA_TF, PDU_ABORT = 0x01, 0x03, 0x04, 0x07


def dicom_service(
    listen_port: int,
    servers: Mapping[str, str | Mapping[str, Any]] | Iterable[OrthancNode],
    *,
    dicom: Mapping[str, Any] | None = None,
    check: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """One ``mode: dicom`` service (see :func:`service`); no health check unless ``check`` says one."""
    spec = service(listen_port, servers, check=check or {"type": "none"}, mode="dicom", **kwargs)
    if dicom is not None:
        spec["dicom"] = dict(dicom)
    return spec


def _ul_item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq_pdu(called: str = "ANY-SCP", calling: str = "RAWSCU", *, version: int = 1) -> bytes:
    """A minimal A-ASSOCIATE-RQ (Verification, implicit VR little endian) built byte by byte (PS3.8 9.3.2)."""
    application_context = _ul_item(0x10, b"1.2.840.10008.3.1.1.1")
    context = _ul_item(
        0x20, bytes([1, 0, 0, 0]) + _ul_item(0x30, VERIFICATION.encode()) + _ul_item(0x40, b"1.2.840.10008.1.2")
    )
    user = _ul_item(0x50, _ul_item(0x51, struct.pack(">I", 16384)) + _ul_item(0x52, b"1.2.826.0.1.3680043.9.7433"))
    body = (
        struct.pack(">HH", version, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + application_context
        + context
        + user
    )
    return struct.pack(">BBI", PDU_ASSOCIATE_RQ, 0, len(body)) + body


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    return struct.pack(">BBIBBBB", PDU_ABORT, 0, 4, 0, 0, source, reason)


def associate_rj_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", PDU_ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


@dataclass(frozen=True)
class RawAnswer:
    """What came back on a plain socket: the bytes, whether the peer closed, and when."""

    data: bytes
    closed: bool  # the peer closed the connection (end of stream or reset) within the bound
    first_byte_after: float | None  # seconds from connecting to the first byte received
    elapsed: float

    @property
    def pdu_type(self) -> int | None:
        return self.data[0] if self.data else None

    def __str__(self) -> str:
        first = "-" if self.first_byte_after is None else f"{self.first_byte_after:.3f}"
        return f"RawAnswer({self.data.hex(' ')}, closed={self.closed}, first_byte_after={first}, {self.elapsed:.3f} s)"

    __repr__ = __str__


def raw_exchange(port: int, payload: bytes = b"", *, host: str = "127.0.0.1", timeout: float = 5.0) -> RawAnswer:
    """Connect with a plain socket, send ``payload`` (possibly nothing), read until the peer closes (bounded)."""
    started = time.monotonic()
    chunks: list[bytes] = []
    first: float | None = None
    closed = False
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if payload:
            sock.sendall(payload)
        while (remaining := started + timeout - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            if first is None:
                first = time.monotonic() - started
            chunks.append(chunk)
    return RawAnswer(b"".join(chunks), closed, first, time.monotonic() - started)


@dataclass(frozen=True)
class AssociationAttempt:
    """How one pynetdicom association request ended, as the client saw it."""

    established: bool
    rejected: bool
    aborted: bool
    rejection: tuple[int, int, int] | None  # (result, source, reason) of the A-ASSOCIATE-RJ received
    echo_status: int | None  # status of one C-ECHO when established (-1: no response)
    local_address: str  # ip:port of the client side, as pacslb's log names the client


def attempt_association(
    port: int,
    source_ip: str = "127.0.0.1",
    *,
    calling_ae: str = "PLBCLIENT",
    called_ae: str = "ANY-SCP",
    host: str = "127.0.0.1",
) -> AssociationAttempt:
    """Request one association; when established, C-ECHO and release. Never raises for a refusal.

    The rejection is taken from the A-ASSOCIATE-RJ PDU as pynetdicom decodes it off the wire. (Its
    ``is_rejected`` is not enough: told no very fast, pynetdicom can report the close that follows the
    A-ASSOCIATE-RJ as an abort, its requestor thread checking the transport after its reader thread has
    acted on the rejection.)
    """
    from pynetdicom import evt
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    client = DicomClient(port, source_ip, host=host, calling_ae=calling_ae, called_ae=called_ae)
    local: list[str] = []
    rejections: list[tuple[int, int, int]] = []

    def opened(event: Any) -> None:
        ip, local_port = event.assoc.dul.socket.socket.getsockname()[:2]
        local.append(f"{ip}:{local_port}")

    def received(event: Any) -> None:
        pdu = event.pdu
        if isinstance(pdu, A_ASSOCIATE_RJ):
            rejections.append((int(pdu.result), int(pdu.source), int(pdu.reason_diagnostic)))

    try:
        assoc = client.ae.associate(
            host,
            port,
            ae_title=called_ae,
            bind_address=(source_ip, 0),
            evt_handlers=[(evt.EVT_CONN_OPEN, opened), (evt.EVT_PDU_RECV, received)],
        )
        client.assoc = assoc
        rejection = rejections[0] if rejections else None
        status = client.echo() if assoc.is_established else None
        return AssociationAttempt(
            assoc.is_established,
            rejection is not None,
            assoc.is_aborted and rejection is None,
            rejection,
            status,
            local[0] if local else "",
        )
    finally:
        client.close()


def echo_as(port: int, calling_ae: str, source_ip: str = "127.0.0.1", called_ae: str = "ANY-SCP") -> str:
    """One association with one C-ECHO under ``calling_ae``; returns the client address (to find its log line)."""
    attempt = attempt_association(port, source_ip, calling_ae=calling_ae, called_ae=called_ae)
    assert attempt.established and attempt.echo_status == 0, f"{calling_ae} from {source_ip}: {attempt}"
    return attempt.local_address


class EchoSCP:
    """An in-process pynetdicom Verification SCP on 127.0.0.1: a node whose refusals a test chooses.

    ``require_called_aet`` makes it reject other called AE titles (1, 1, 7); ``require_calling_aet`` other
    calling AE titles (1, 1, 3); past ``maximum_associations`` it rejects (2, 3, 2). A context manager: the
    server is shut down on exit.
    """

    def __init__(
        self,
        ae_title: str = "ECHOSCP",
        *,
        require_called_aet: bool = False,
        require_calling_aet: Iterable[str] = (),
        maximum_associations: int = 10,
    ) -> None:
        from pynetdicom import AE

        self.port = free_port()
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = require_called_aet
        self.ae.require_calling_aet = list(require_calling_aet)
        self.ae.maximum_associations = maximum_associations
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = PYNETDICOM_TIMEOUT
        self.ae.add_supported_context(VERIFICATION)
        self.server: Any = None
        self.accepted: list[str] = []  # calling AE title of every association it accepted
        self.peers: list[str] = []  # and the address it came from

    def _on_accepted(self, event: Any) -> None:
        self.accepted.append(str(event.assoc.requestor.ae_title).strip())
        self.peers.append(str(event.assoc.requestor.address))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EchoSCP:
        from pynetdicom import evt

        handlers = [(evt.EVT_ACCEPTED, self._on_accepted)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until no association is active: a released one stays counted against
        ``maximum_associations`` until the server's thread for it has ended, a moment after the peer saw
        the release."""
        wait_for(lambda: not self.server.active_associations, timeout, f"{self.address} to have no association")

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()

    def __enter__(self) -> EchoSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ScriptedNode:
    """A fake node on 127.0.0.1 that reads each A-ASSOCIATE-RQ and then answers ``answer`` (bytes), or
    closes at once (``answer=None``), or stays silent until the peer leaves (``silent=True``).

    It keeps every RQ it received (``requests``), so a test can check what pacslb forwarded. A context
    manager: its thread and sockets are closed on exit; every wait is bounded.
    """

    def __init__(self, answer: bytes | None = None, *, silent: bool = False) -> None:
        self.answer, self.silent = answer, silent
        self.port = free_port()
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedNode:
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5.0)
        self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"scripted-node-{self.port}")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.1)
            data = b""
            deadline = time.monotonic() + PYNETDICOM_TIMEOUT
            while not self._stop.is_set() and time.monotonic() < deadline:
                if len(data) >= 6 and len(data) >= 6 + int.from_bytes(data[2:6], "big"):
                    break
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk
            self.requests.append(data)
            if self.silent:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    try:
                        if not conn.recv(65536):
                            return
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                return
            if self.answer is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(self.answer)
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(1.0)
                    conn.recv(65536)  # let the peer close first (bounded)


class StoreSCP:
    """dcmtk's ``storescp`` as a node, with fault options such as ``--refuse``; stopped by PID on exit."""

    def __init__(self, root: Path, *options: str, ae_title: str = "STORESCP") -> None:
        self.port = free_port()
        self.root = root
        self.options = options
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "storescp.log"

    def __enter__(self) -> StoreSCP:
        require_peers()
        (self.root / "out").mkdir(parents=True, exist_ok=True)
        args = [str(DCMTK_BIN / "storescp"), "-v", *self.options, "-aet", self.ae_title]
        args += ["--output-directory", str(self.root / "out"), str(self.port)]
        self.proc = _popen(args, self.log_path)
        wait_for(lambda: not tcp_connect_refused(self.port), 10.0, f"storescp on port {self.port}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop_process(self.proc, 5.0)
            self.proc = None

    def log(self) -> str:
        return _tail(self.log_path)


# ------------------------------------------------------------------------------------------ mode http
#
# nginx nodes for the http-mode tests: each answers with its own name and the forwarding fields it
# received (so a test sees which node served a request and what pacslb added), serves a large file,
# stores PUT uploads (its WebDAV module), and answers HEAD properly, as a real web server does.

NGINX_BIN = Path("/usr/sbin/nginx")
#: nginx is ready within milliseconds; 10 s allows for a loaded machine.
NGINX_START_TIMEOUT = 10.0

#: One process (no master), so that killing it kills the node, as a crash of the machine would.
_NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
user root;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    keepalive_requests 100000;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        client_max_body_size 0;
        location = /whoami {{
            default_type text/plain;
            add_header X-Node {name};
            return 200 "{echo}\\n";
        }}
        location /upload/ {{
            dav_methods PUT;
            create_full_put_path on;
            client_body_temp_path {root}/tmp;
        }}
        location / {{
            add_header X-Node {name};
        }}
    }}
}}
"""


#: What /whoami answers: the node's name and the fields it received that pacslb adds or changes.
_NGINX_ECHO = (
    "node={name} xff=$http_x_forwarded_for proto=$http_x_forwarded_proto host=$http_host "
    "xfh=$http_x_forwarded_host fwd=$http_forwarded cookie=$http_cookie conn=$http_connection"
)


@dataclass
class NginxNode:
    """One nginx process on a loopback port: a web node that says who it is."""

    name: str
    port: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def www(self) -> Path:
        return self.root / "www"

    def start(self) -> NginxNode:
        if not NGINX_BIN.exists():
            pytest.fail(f"nginx is missing: {INSTALL_HINT}", pytrace=False)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        (self.www / "upload").mkdir(parents=True, exist_ok=True)
        (self.www / "index.html").write_text(f"<html><body>{self.name}</body></html>\n")
        conf = self.root / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(
                root=self.root,
                port=self.port,
                name=self.name,
                echo=_NGINX_ECHO.format(name=self.name),
            )
        )
        self.proc = _popen([str(NGINX_BIN), "-c", str(conf), "-p", str(self.root)], self.root / "nginx.out")
        wait_for(self._ready, NGINX_START_TIMEOUT, f"nginx {self.name} on port {self.port}")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"nginx {self.name} exited: {_tail(self.root / 'error.log')}", pytrace=False)
        try:
            return httpx.get(f"{self.url}/whoami", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, 10.0, signal.SIGQUIT)  # graceful: finish what is in flight, then exit
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, 5.0, signal.SIGKILL)
            self.proc = None


def start_nginx(root: Path, count: int) -> list[NginxNode]:
    """``count`` nginx nodes named web1, web2, ... each on its own free port."""
    nodes = [NginxNode(f"web{i + 1}", free_port(), root / f"web{i + 1}") for i in range(count)]
    try:
        for node in nodes:
            node.start()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


#: An http check quick enough for tests (two failures take a node down: a first check on a machine busy
#: starting things can be slow).
HTTP_CHECK: dict[str, Any] = {
    "type": "http",
    "method": "GET",
    "path": "/whoami",
    "interval": "500ms",
    "timeout": "500ms",
    "rise": 1,
    "fall": 2,
}


def http_service(
    listen_port: int,
    nodes: Iterable[NginxNode | OrthancNode],
    *,
    persistence: Mapping[str, Any] | None = None,
    check: Mapping[str, Any] | None = None,
    http: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One http-mode service as a config mapping."""
    servers = {
        node.name: (node.address if isinstance(node, NginxNode) else f"127.0.0.1:{node.http_port}") for node in nodes
    }
    spec = service(
        listen_port,
        servers,
        persistence=persistence or {"type": "cookie+source_ip"},
        check=check or HTTP_CHECK,
        mode="http",
        **extra,
    )
    spec["mode"] = "http"
    if http is not None:
        spec["http"] = dict(http)
    return spec


def http_config(services: Mapping[str, Mapping[str, Any]], workers: int | str = 1, **top: Any) -> str:
    """A config for the http-mode tests: one process (HTTP is served by the main process; relay workers
    only carry Upgrade tunnels, which test_http_upgrade covers with them), a short shutdown grace."""
    top.setdefault("shutdown_grace", "1s")
    return config_text(services, workers=workers, **top)


# ------------------------------------------------------------------------------------ operations (admin)
#
# Helpers for the operations tests (test_admin_*.py, tests/browser): the admin section of a config and
# calls to the admin API of a running pacslb.

#: A call to the admin API answers in milliseconds; a reload in a second or two on a busy machine.
ADMIN_TIMEOUT = 15.0


#: The token file of each admin port given to :func:`admin_section`: :func:`admin_api` sends its token
#: unless told otherwise (with a token, reads need it too).
_admin_token_files: dict[int, Path] = {}


def admin_section(port: int, token_file: Path | None = None, **extra: Any) -> dict[str, Any]:
    """The ``admin:`` mapping of a config: the API on 127.0.0.1:``port``."""
    section: dict[str, Any] = {"listen": f"127.0.0.1:{port}", **extra}
    if token_file is not None:
        section["token_file"] = str(token_file)
        _admin_token_files[port] = token_file
    return section


def admin_token(port: int) -> str | None:
    """The token of the admin API on ``port``, when :func:`admin_section` was given a token file."""
    path = _admin_token_files.get(port)
    return path.read_text().splitlines()[0].strip() if path is not None else None


def admin_api(port: int, method: str, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
    """One request to the admin API of the pacslb listening on ``port``, as pacslb's CLI makes it: with
    ``X-Pacslb-Request: 1`` and the token (``token``; None: the port's own, see :func:`admin_token`; "":
    none)."""
    token = admin_token(port) if token is None else token
    headers = {"X-Pacslb-Request": "1", **kwargs.pop("headers", {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(
        method, f"http://127.0.0.1:{port}{path}", headers=headers, timeout=ADMIN_TIMEOUT, trust_env=False, **kwargs
    )


def admin_server(port: int, service: str, node: str) -> dict[str, Any]:
    """One server's entry in GET /api/v1/status."""
    status = admin_api(port, "GET", "/api/v1/status").json()
    svc = next(s for s in status["services"] if s["name"] == service)
    return dict(next(s for s in svc["servers"] if s["name"] == node))
