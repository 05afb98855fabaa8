"""The embedded demo, as a newcomer meets it: `python -m pacslb demo`, driven with dcmtk and plain HTTP.

The process tests start the real command on free loopback ports, wait for its "ready" banner, use the
commands the banner suggests through the balanced services, check what the simulated nodes report on
their own status pages, then stop it with SIGTERM and check that it cleaned up after itself. The last
tests pin down the nodes' C-FIND matching (PS3.4 C.2.2.2), which the dcmtk runs only touch in part.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacslb.demo import NODE_COUNT, WORKLIST, DemoPorts, answer, matches

peers = pytest.mark.peers
pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
#: The demo imports pydicom and pynetdicom and writes a study before it listens: a few seconds at most.
READY_TIMEOUT = 30.0
#: SIGTERM lets connections finish for the demo's 2 s grace, then the nodes stop.
STOP_TIMEOUT = 10.0
#: Bound on every client command; each takes well under a second when things work.
CLIENT_TIMEOUT = 30.0
AE = "INFINITT"


def _dcmtk(name: str) -> str:
    """The path of dcmtk's ``name``. pynetdicom installs same-named apps that may come first on PATH."""
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            version = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
            )
            if "dcmtk" in version.stdout:
                return candidate
    pytest.fail(f"dcmtk's {name} is not installed (run tests/peers/install.sh)")


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as sock:
            # As the demo's servers bind: a port whose old connections linger in TIME_WAIT is usable.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _listening(ports: list[int]) -> list[int]:
    """The ports among ``ports`` on which something accepts connections."""
    found = []
    for port in ports:
        with socket.socket() as sock:
            sock.settimeout(5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                found.append(port)
    return found


def _free_base() -> int:
    """A base port (20000-40000) for which every port the demo derives from it is free."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000, 10)
        if _ports_free(DemoPorts(base).all()):
            return base
    raise RuntimeError("no base port with all demo ports free")


class Demo:
    """One `python -m pacslb demo` process, its stdout lines and its stderr log."""

    def __init__(self, log_path: Path, *extra: str, base: int | None = None) -> None:
        self.base = base if base is not None else _free_base()
        self.ports = DemoPorts(self.base)
        self.log_path = log_path
        self.lines: list[str] = []
        self._ready = threading.Event()
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacslb", "demo", "--base-port", str(self.base), *extra],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "ready" in line:
                self._ready.set()
        self._ready.set()  # EOF: the process ended; wait_ready reports it

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        assert self._ready.wait(READY_TIMEOUT), f"no 'ready' within {READY_TIMEOUT} s:\n{self.stderr()}"
        assert self.lines and "ready" in self.lines[0], f"demo ended before ready:\n{self.stderr()}"
        # The banner is one flushed print; its last lines follow the first at once.
        deadline = time.monotonic() + 5
        while not any("--no-persistence" in line for line in self.lines) and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def banner(self) -> str:
        return "\n".join(self.lines)

    def study_dir(self) -> Path:
        match = re.search(r"^Demo study: \d+ CT images in (.+)$", self.banner, re.MULTILINE)
        assert match, self.banner
        return Path(match.group(1))

    def node_status(self, index: int) -> dict[str, Any]:
        """A node's /status, asked directly (not through the balancer)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.node_http(index)}/status", timeout=10) as r:
            data: dict[str, Any] = json.load(r)
            return data

    def statuses(self) -> list[dict[str, Any]]:
        return [self.node_status(i) for i in range(1, NODE_COUNT + 1)]

    def stop(self) -> int:
        """SIGTERM; the exit code. Fails if the process is still there after STOP_TIMEOUT."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not exit within {STOP_TIMEOUT} s of SIGTERM:\n{self.stderr()}")
        self._reader.join(5)
        return code

    def end(self) -> None:
        """Whatever a failed test left running: SIGTERM first, so the demo still removes its files."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._log.close()


@pytest.fixture
def start_demo(tmp_path: Path) -> Any:
    started: list[Demo] = []

    def start(*extra: str, base: int | None = None) -> Demo:
        demo = Demo(tmp_path / f"demo{len(started)}.log", *extra, base=base)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.end()


def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, cwd=cwd, check=False)


def _echo(port: int) -> subprocess.CompletedProcess[str]:
    return _run(_dcmtk("echoscu"), "-ta", "10", "-td", "10", "-aec", AE, "127.0.0.1", str(port))


def _find(*args: str, port: int, out: Path) -> list[pydicom.Dataset]:
    """findscu with its responses extracted to files; the decoded responses, in order."""
    out.mkdir()
    result = _run(_dcmtk("findscu"), "-ta", "10", "-td", "10", "-X", "-od", str(out), *args, "127.0.0.1", str(port))
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def _http(port: int, path: str = "/", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def _assert_clean_exit(demo: Demo, study_dir: Path) -> None:
    # Its only children are relay workers and web workers (one of each per extra core); the stop must end
    # them too.
    children = _run("ps", "-o", "pid=,args=", "--ppid", str(demo.proc.pid)).stdout.splitlines()
    kinds = sorted(line.split()[3] for line in children)
    assert kinds == sorted(
        ["pacslb.proxy.workers.relayworker", "pacslb.proxy.workers.webworker"] * (len(children) // 2)
    ), children
    assert demo.stop() == 0, demo.stderr()
    pids = [line.split()[0] for line in children]
    left = [pid for pid in pids if _run("ps", "-o", "stat=", "-p", pid).stdout.strip() not in ("", "Z")]
    assert left == [], f"workers outlived the demo: {left}"
    assert not study_dir.exists(), "the demo left its temporary directory behind"
    assert _listening(demo.ports.all()) == [], "something still listens on a demo port after exit"


@peers
def test_demo_serves_the_four_services(start_demo: Any, tmp_path: Path) -> None:
    demo = start_demo()
    demo.wait_ready()
    ports = demo.ports
    study_dir = demo.study_dir()
    files = sorted(study_dir.glob("*.dcm"))
    assert len(files) == 4
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    assert f"echoscu -v -aec {AE} 127.0.0.1 {ports.service('dicom')}" in demo.banner

    # C-ECHO through the dicom and mwl services.
    for _ in range(3):
        result = _echo(ports.service("dicom"))
        assert result.returncode == 0, result.stderr
    result = _echo(ports.service("mwl"))
    assert result.returncode == 0, result.stderr

    # C-STORE of the generated study through the dicom service.
    result = _run(
        _dcmtk("storescu"), "-ta", "10", "-td", "10", "-aec", AE, "127.0.0.1", str(ports.service("dicom")),
        *map(str, files),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    statuses = demo.statuses()
    receivers = [s for s in statuses if s["received"]["instances"] > 0]
    assert len(receivers) == 1, statuses
    receiver = receivers[0]
    assert receiver["received"] == {"instances": 4, "studies": 1}
    # Source-IP persistence: the node that took the study also answered all three echoes before it.
    assert receiver["requests"]["echo"] >= 3, statuses
    assert all(s["archive"]["study_uids"] == [study_uid] for s in statuses)

    # C-FIND (study root) through the query service finds it.
    responses = _find(
        "-S", "-aec", AE, "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientName",
        "-k", "ModalitiesInStudy", "-k", "NumberOfStudyRelatedInstances",
        port=ports.service("query"), out=tmp_path / "find",
    )  # fmt: skip
    assert [r.StudyInstanceUID for r in responses] == [study_uid]
    assert str(responses[0].PatientName) == "DEMO^PACSLB"
    assert responses[0].ModalitiesInStudy == "CT"
    assert int(responses[0].NumberOfStudyRelatedInstances) == 4

    # Modality worklist through the mwl service: the Modality filter selects the CT steps only.
    for modality, out in (("CT", "mwl-ct"), ("MR", "mwl-mr")):
        responses = _find(
            "-W", "-aec", AE, "-k", "PatientName", "-k", f"ScheduledProcedureStepSequence[0].Modality={modality}",
            port=ports.service("mwl"), out=tmp_path / out,
        )  # fmt: skip
        expected = sorted(o.patient_name for o in WORKLIST if o.modality == modality)
        assert expected, modality
        assert sorted(str(r.PatientName) for r in responses) == expected
        assert all(r.ScheduledProcedureStepSequence[0].Modality == modality for r in responses)

    # HTTP through the web service: a node's page, the same node every time (persistence).
    status, headers, body = _http(ports.service("web"))
    assert status == 200
    node = headers["X-PACS-Node"]
    assert node in {f"pacs{i}" for i in range(1, NODE_COUNT + 1)}
    assert f"<h1>{node} answered</h1>" in body.decode()
    status, headers, body = _http(ports.service("web"), "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    for _ in range(3):
        status, headers, body = _http(ports.service("web"), "/status")
        assert status == 200 and json.loads(body)["node"] == node

    _assert_clean_exit(demo, study_dir)


def _new_shell_env() -> dict[str, str]:
    """The environment of a new shell: no virtual environment active, nothing of this test's Python on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return env


#: The programs the banner's indented command lines start with (the pacslb and Python paths vary).
BANNER_PROGRAMS = ("echoscu", "storescu", "findscu", "curl")


@peers
def test_every_command_the_banner_prints_works_pasted_into_a_new_shell(start_demo: Any) -> None:
    demo = start_demo()
    demo.wait_ready()
    pacslb = Path(sys.executable).parent / "pacslb"
    commands = [
        line.strip()
        for line in demo.lines
        if line.startswith("  ")
        and (line.split()[0] in BANNER_PROGRAMS or line.split()[0].endswith(("/pacslb", "/python", "python3")))
    ]
    programs = sorted({command.split()[0] for command in commands})
    assert "echoscu" in programs and "curl" in programs and len(commands) >= 8, demo.banner
    env = _new_shell_env()
    ran = []
    for command in commands:
        if command.endswith("demo --no-persistence"):  # a second demo, after stopping this one
            prefix = command.removesuffix(" demo --no-persistence")
            assert any(c.startswith(prefix + " status ") for c in commands), command
            continue
        # As pasted: one line into a new shell in the directory the demo started in.
        done = subprocess.run(
            ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{command!r} failed ({done.returncode}):\n{output}"
        assert output.strip(), f"{command!r} printed nothing"
        ran.append(command)
    status = next(c for c in ran if " status " in c)
    assert status.startswith(str(pacslb.relative_to(REPO)) if pacslb.is_relative_to(REPO) else str(pacslb)), status
    # What the user pasted reached the nodes: the study, the echoes (dcmtk's and pynetdicom's), the finds.
    statuses = demo.statuses()
    assert sum(s["received"]["instances"] for s in statuses) == 4, statuses
    assert sum(s["requests"]["echo"] for s in statuses) >= 2, statuses
    _assert_clean_exit(demo, demo.study_dir())


@peers
def test_demo_without_persistence_spreads_connections(start_demo: Any) -> None:
    demo = start_demo("--no-persistence")
    demo.wait_ready()
    assert "Persistence is off" in demo.banner

    nodes = set()
    for _ in range(6):
        status, headers, _body = _http(demo.ports.service("web"))
        assert status == 200
        nodes.add(headers["X-PACS-Node"])
    assert len(nodes) >= 2, f"six connections all went to {nodes}"

    for _ in range(3):
        result = _echo(demo.ports.service("dicom"))
        assert result.returncode == 0, result.stderr
    echoes = [s["requests"]["echo"] for s in demo.statuses()]
    assert sum(echoes) == 3 and max(echoes) < 3, echoes

    _assert_clean_exit(demo, demo.study_dir())


@peers
def test_demo_reports_a_taken_port_and_cleans_up(start_demo: Any) -> None:
    # Hold the dicom service's port: the nodes start, the balancer cannot, and the demo says which port.
    with socket.socket() as blocker:
        base = _free_base()
        port = DemoPorts(base).service("dicom")
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        demo = start_demo(base=base)
        code = demo.proc.wait(READY_TIMEOUT)
    assert code == 1
    log = demo.stderr()
    assert f"cannot listen on 127.0.0.1:{port}" in log
    assert "--base-port" in log
    match = re.search(r"demo_study directory=(\S+)", log)
    assert match, log
    assert not Path(match.group(1)).exists()


def _dataset(**values: Any) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


STUDY = _dataset(
    PatientName="Doe^Jane", PatientID="P1", StudyInstanceUID="1.2.3", StudyDate="20240315", StudyTime="093000",
    ModalitiesInStudy=["CT", "MR"],
)  # fmt: skip


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"PatientName": ""}, True),  # empty key: universal match
        ({"PatientID": "P1"}, True),
        ({"PatientID": "P2"}, False),
        ({"PatientName": "DOE^*"}, True),  # wildcard; names match regardless of case
        ({"PatientName": "Doe^J?ne"}, True),
        ({"PatientID": "P*2"}, False),
        ({"StudyDate": "20240101-20241231"}, True),  # range
        ({"StudyDate": "20240316-"}, False),  # open range, after the study
        ({"StudyTime": "0900-1000"}, True),  # short bounds cover the whole hour
        ({"StudyTime": "1000-"}, False),
        ({"StudyInstanceUID": ["9.9", "1.2.3"]}, True),  # UID list
        ({"ModalitiesInStudy": "MR"}, True),  # any value of a multi-valued attribute
        ({"ModalitiesInStudy": "US"}, False),
        ({"AccessionNumber": "A1"}, False),  # a key the record lacks cannot match a value
    ],
)
def test_find_matching(keys: dict[str, Any], expected: bool) -> None:
    query = _dataset(QueryRetrieveLevel="STUDY", **keys)
    assert matches(query, STUDY) is expected


def test_find_answer_holds_exactly_the_requested_keys() -> None:
    query = _dataset(QueryRetrieveLevel="STUDY", PatientName="", AccessionNumber="")
    out = answer(query, STUDY)
    assert sorted(e.keyword for e in out) == ["AccessionNumber", "PatientName", "QueryRetrieveLevel"]
    assert str(out.PatientName) == "Doe^Jane"
    assert out["AccessionNumber"].is_empty  # asked for, not held: present and empty


def test_worklist_sequence_matching_returns_the_matching_step() -> None:
    ct = _dataset(Modality="CT", ScheduledStationAETitle="CT01")
    mr = _dataset(Modality="MR", ScheduledStationAETitle="MR01")
    record = _dataset(PatientName="Doe^Jane", ScheduledProcedureStepSequence=[ct, mr])
    query = _dataset(PatientName="", ScheduledProcedureStepSequence=[_dataset(Modality="MR")])
    assert matches(query, record)
    steps = answer(query, record).ScheduledProcedureStepSequence
    assert [step.Modality for step in steps] == ["MR"]
    query.ScheduledProcedureStepSequence[0].Modality = "US"
    assert not matches(query, record)
