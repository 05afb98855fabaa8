"""mode http with bodies far larger than memory should hold: a 1 GiB download and a 1 GiB upload through
pacslb arrive intact (SHA-256 on both ends), and pacslb's resident memory stays flat meanwhile (sampled
from /proc while the bytes flow)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import peers
import pytest
from peers import NginxNode, PacslbProcess

pytestmark = pytest.mark.peers

PacslbFactory = Callable[[str], PacslbProcess]

GIB = 1024**3
#: A block of a prime size, so that a dropped, doubled or misplaced block changes the checksum.
BLOCK = 1_000_003
#: pacslb's resident memory must stay under this during the transfers: its buffers are bounded at a few
#: hundred KiB per direction, and the interpreter with every module loaded takes about 60 MB.
MAX_RSS = 200 * 1024 * 1024


def pattern() -> bytes:
    return hashlib.shake_256(b"pacslb bulk").digest(BLOCK)


def blocks(total: int) -> Iterator[bytes]:
    block = pattern()
    sent = 0
    while sent < total:
        piece = block[: min(BLOCK, total - sent)]
        sent += len(piece)
        yield piece


def expected_sha256(total: int) -> str:
    digest = hashlib.sha256()
    for piece in blocks(total):
        digest.update(piece)
    return digest.hexdigest()


class RssSampler:
    """Samples a process's VmRSS every 50 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
                    self.samples += 1
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[NginxNode]:
    (node,) = peers.start_nginx(tmp_path / "nginx", 1)
    yield node
    node.stop()


def test_one_gib_download_and_upload_pass_intact_with_flat_memory(
    pacslb: PacslbFactory, web: NginxNode, tmp_path: Path
) -> None:
    want = expected_sha256(GIB)
    with (web.www / "study.zip").open("wb") as f:
        for piece in blocks(GIB):
            f.write(piece)
    port = peers.free_port()
    lb = pacslb(peers.http_config({"web": peers.http_service(port, [web])}))
    url = f"http://127.0.0.1:{port}"
    timeout = httpx.Timeout(60.0)

    with RssSampler(lb.pid) as rss:
        started = time.monotonic()
        digest, size = hashlib.sha256(), 0
        with httpx.stream("GET", f"{url}/study.zip", timeout=timeout) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(GIB)
            for piece in response.iter_raw(1024 * 1024):
                digest.update(piece)
                size += len(piece)
        download = time.monotonic() - started
        assert size == GIB and digest.hexdigest() == want

        started = time.monotonic()
        # A generator body: httpx sends it chunked, as an uploading viewer or a script would.
        answer = httpx.put(f"{url}/upload/study.zip", content=blocks(GIB), timeout=timeout)
        upload = time.monotonic() - started
        assert answer.status_code == 201, answer.text
    stored = web.www / "upload" / "study.zip"
    assert stored.stat().st_size == GIB
    digest = hashlib.sha256()
    with stored.open("rb") as f:
        while piece := f.read(8 * 1024 * 1024):
            digest.update(piece)
    assert digest.hexdigest() == want
    assert rss.samples > 10
    assert rss.peak < MAX_RSS, f"pacslb's RSS reached {rss.peak / 2**20:.0f} MiB"
    lines = lb.wait_events("request", 2, timeout=5)
    assert [int(e.get("bytes_up")) for e in lines] == [0, GIB]
    assert int(lines[0].get("bytes_down")) > GIB
    print(
        f"1 GiB down {GIB / download / 2**20:.0f} MiB/s, up {GIB / upload / 2**20:.0f} MiB/s, peak RSS "
        f"{rss.peak / 2**20:.0f} MiB"
    )
