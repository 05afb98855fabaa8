"""How long a binding made on one balancer takes to reach another through the Redis store (the goal: 200 ms).

Two Redis stores (pacslb/state/redis.py) in one process, each with its own connection to a redis-server
started here on loopback, as two balancers would be: a client's binding is made in the first store's table
(as a connection would), and the time until the second store's table holds it is measured, one binding at a
time. It includes the store's gathering of changes (FLUSH_INTERVAL), the pipeline, the script, pub/sub and the
apply. A bench, not a test: it prints figures and asserts nothing.

    python bench/store_latency.py [--samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacslb.config.values import parse_store_location  # noqa: E402
from pacslb.state.redis import FLUSH_INTERVAL, RedisStore  # noqa: E402

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(url: str, samples: int) -> list[float]:
    location = parse_store_location(url)
    one, two = RedisStore(location, "lb1"), RedisStore(location, "lb2")
    tables = [store.persistence_table("dicom", 1800.0, 100_000) for store in (one, two)]
    await one.start()
    await two.start()
    try:
        deadline = time.monotonic() + 10
        while not (one.synced and two.synced):
            if time.monotonic() > deadline:
                raise SystemExit("the stores did not sync with redis-server within 10 s")
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        times: list[float] = []
        for i in range(samples):
            key = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            started = time.perf_counter()
            tables[0].acquire(key, "pacs1" if i % 2 else "pacs2", loop.time())
            while tables[1].peek(key) is None:
                await asyncio.sleep(0.0005)
                if time.perf_counter() - started > 5:
                    raise SystemExit(f"binding {key} did not arrive within 5 s")
            times.append(time.perf_counter() - started)
            tables[0].release(key, "pacs1" if i % 2 else "pacs2", loop.time())
            await asyncio.sleep(0.005)  # one binding at a time: each pays the gathering on its own
        return times
    finally:
        await one.close()
        await two.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/store_latency.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pacslb-store-latency-") as work:
        server = subprocess.Popen(
            [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", work],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:  # redis-server listening before the stores connect (else they start "down")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("redis-server did not listen within 10 s") from None
                    time.sleep(0.02)
            times = asyncio.run(measure(f"redis://127.0.0.1:{port}/0", args.samples))
        finally:
            server.terminate()
            server.wait(timeout=10)
    ms = sorted(t * 1000 for t in times)
    print(f"binding made on lb1 -> applied on lb2, {len(ms)} samples, redis-server on loopback")
    print(f"  median {statistics.median(ms):.1f} ms, p90 {ms[int(len(ms) * 0.9)]:.1f} ms, max {ms[-1]:.1f} ms")
    print(f"  (of which up to {FLUSH_INTERVAL * 1000:.0f} ms is the store gathering changes before it writes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
