"""The admin API against an engine running in-process, with small asyncio backends: every endpoint, the
token, the browser guards, drain and halt on live connections, weights, persistence, reload, fate sharing,
metrics, the dashboard's files, and admin states that survive a reload and a restart.

Each backend greets a connection with its name and a newline, then echoes: a test sees which node it
reached. The engine runs on uvloop, as in production; the API is called over real HTTP with httpx.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import peers
import uvloop

from pacslb.config import load_config
from pacslb.engine import Engine

T = TypeVar("T")
TOKEN = "s3cret-token-for-the-tests-0123456789"
#: Every scenario is bounded; a hung one fails instead of hanging the suite.
SCENARIO_TIMEOUT = 60.0


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), SCENARIO_TIMEOUT)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def free_port() -> int:
    return peers.free_port()


async def backend(name: str) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name.encode() + b"\n")
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def connect(port: int, source: str = "127.0.0.1") -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    line = await asyncio.wait_for(reader.readline(), 5)
    return line.decode().strip(), reader, writer


class Rig:
    """An engine with two services (a: tcp with source-IP persistence, b: tcp) over nodes n1, n2, n3."""

    def __init__(self, tmp: Path, token: bool, extra: str) -> None:
        self.tmp = tmp
        self.token = token
        self.extra = extra
        self.port_a = free_port()
        self.port_b = free_port()
        self.admin_port = free_port()
        self.backends: dict[str, asyncio.Server] = {}
        self.engine: Engine | None = None
        self.http: httpx.AsyncClient | None = None
        self.path = tmp / "pacslb.yaml"

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.backends[name].sockets[0].getsockname()[1]}"

    def config(self, b_weight: int = 1, extra: str | None = None) -> str:
        token = f", token_file: {self.tmp / 'token'}" if self.token else ""
        return (
            f"workers: 1\nshutdown_grace: 1s\n"
            f"admin: {{listen: 127.0.0.1:{self.admin_port}{token}, state_file: {self.tmp / 'state.json'}}}\n"
            f"{self.extra if extra is None else extra}"
            "services:\n"
            f"  a:\n    listen: 127.0.0.1:{self.port_a}\n    balance: roundrobin\n"
            "    persistence: {type: source_ip}\n    check: {type: none}\n"
            f"    servers: {{n1: {self.addr('a1')}, n2: {self.addr('a2')}, n3: {self.addr('a3')}}}\n"
            f"  b:\n    listen: 127.0.0.1:{self.port_b}\n    balance: roundrobin\n    check: {{type: none}}\n"
            f"    servers: {{n1: {self.addr('b1')}, n2: {{address: {self.addr('b2')}, weight: {b_weight}}}}}\n"
        )

    async def start(self) -> Rig:
        (self.tmp / "token").write_text(TOKEN + "\n")
        for name in ("a1", "a2", "a3", "b1", "b2"):
            self.backends[name] = await backend(f"n{name[1]}")
        self.path.write_text(self.config())
        self.engine = Engine(load_config(self.path), str(self.path))
        await self.engine.start()
        # As pacslb's CLI: X-Pacslb-Request marks the requests as no browser form's (guard.py).
        headers = {"X-Pacslb-Request": "1"}
        if self.token:
            headers["Authorization"] = f"Bearer {TOKEN}"
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.admin_port}", headers=headers, timeout=10)
        return self

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.engine is not None:
            await self.engine.shutdown(grace=1)
        for server in self.backends.values():
            server.close()

    async def server(self, service: str, node: str) -> dict[str, Any]:
        assert self.http is not None
        status = (await self.http.get("/api/v1/status")).json()
        svc = next(s for s in status["services"] if s["name"] == service)
        return dict(next(s for s in svc["servers"] if s["name"] == node))


@asynccontextmanager
async def rig(tmp: Path, token: bool = False, extra: str = "") -> AsyncIterator[Rig]:
    r = Rig(tmp, token, extra)
    try:
        yield await r.start()
    finally:
        await r.stop()


# -- status, events, openapi, dashboard --------------------------------------------------------------------


def test_status_document_has_the_contract_shape(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], int, str, dict[str, Any], str, str]:
        async with rig(tmp_path) as r:
            assert r.http is not None
            node, _, writer = await connect(r.port_a)
            status = (await r.http.get("/api/v1/status")).json()
            writer.close()
            openapi = (await r.http.get("/openapi.json")).json()
            page = await r.http.get("/")
            script = await r.http.get("/static/dashboard.js")
            health = (await r.http.get("/healthz")).json()
            assert health == {"ok": True}
            return status, page.status_code, page.text, openapi, script.text, node

    status, page_code, page, openapi, script, node = run(scenario)
    assert [s["name"] for s in status["services"]] == ["a", "b"]
    a = status["services"][0]
    assert {"name", "mode", "listen", "servers"} <= set(a)
    assert a["mode"] == "tcp" and a["listen"].endswith(":" + a["listen"].rsplit(":", 1)[1])
    servers = {s["name"]: s for s in a["servers"]}
    assert set(servers) == {"n1", "n2", "n3"}
    for server in servers.values():
        assert {"name", "address", "health", "admin", "weight", "active", "total"} <= set(server)
        assert server["health"] == "up" and server["admin"] == "online" and server["weight"] == 1
    assert servers[node]["active"] == 1 and servers[node]["total"] == 1
    assert {n["name"] for n in status["nodes"]} == {"n1", "n2", "n3"}
    # The dashboard is pacslb's own: no asset from anywhere else.
    assert page_code == 200 and "/static/dashboard.js" in page and "http" not in page.split("<body>")[1]
    assert "fetch(" in script and "https://" not in script
    paths = set(openapi["paths"])
    assert {"/api/v1/status", "/api/v1/nodes/{node}/{action}", "/api/v1/services/{service}/servers/{node}/{action}",
            "/api/v1/reload", "/metrics"} <= paths  # fmt: skip


def test_metrics_follow_prometheus_conventions(tmp_path: Path) -> None:
    async def scenario() -> str:
        async with rig(tmp_path) as r:
            assert r.http is not None
            _, reader, writer = await connect(r.port_a)
            writer.write(b"x" * 1000)
            await reader.readexactly(1000)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.2)
            r.engine.nodes.set_admin("n2", "drain")  # type: ignore[union-attr]
            response = await r.http.get("/metrics")
            assert response.headers["content-type"].startswith("text/plain")
            return response.text

    text = run(scenario)
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line[:1].isalpha()}
    names = {name.split("{")[0] for name in samples}
    assert all(n.startswith(("pacslb_", "process_")) for n in names), names
    assert {"pacslb_server_up", "pacslb_server_active_connections", "pacslb_server_connections_total",
            "pacslb_server_bytes_total", "pacslb_service_connections_total", "pacslb_persistence_entries",
            "pacslb_server_admin_state", "pacslb_config_reloads_total"} <= names  # fmt: skip
    moved = sum(v for k, v in samples.items() if k.startswith("pacslb_server_bytes_total{") and 'service="a"' in k)
    assert moved == 2003  # 1000 each way plus the greeting, counted when the connection ended
    assert samples['pacslb_service_connections_total{service="a"}'] == 1
    assert samples['pacslb_persistence_entries{service="a"}'] == 1
    assert samples['pacslb_server_admin_state{server="n2",service="b",state="drain"}'] == 1


# -- admin states --------------------------------------------------------------------------------------------


def test_drain_keeps_open_and_pinned_clients_and_sends_new_ones_elsewhere(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], str, bytes, set[str], str, list[dict[str, Any]]]:
        async with rig(tmp_path) as r:
            assert r.http is not None
            # A client from 127.0.0.2 is pinned (source-IP persistence) to the node it got.
            pinned_node, reader, writer = await connect(r.port_a, "127.0.0.2")
            answer = (await r.http.post(f"/api/v1/nodes/{pinned_node}/drain")).json()
            writer.write(b"still here")
            still = await asyncio.wait_for(reader.readexactly(10), 5)
            others = set()
            for i in range(6):  # new clients never get the drained node
                node, _, w = await connect(r.port_a, f"127.0.1.{i + 1}")
                others.add(node)
                w.close()
            again, _, w = await connect(r.port_a, "127.0.0.2")  # the pinned client comes back to it
            w.close()
            writer.close()
            events = (await r.http.get("/api/v1/events")).json()["events"]
            return answer, pinned_node, still, others, again, events

    answer, pinned_node, still, others, again, events = run(scenario)
    assert answer["services"] == ["a", "b"] and answer["action"] == "drain"
    assert still == b"still here"
    assert pinned_node not in others and others
    assert again == pinned_node
    assert any(e["kind"] == "admin" and pinned_node in e["message"] and "drain" in e["message"] for e in events)


def test_halt_drops_persistence_and_closes_connections_after_the_grace(tmp_path: Path) -> None:
    async def scenario() -> tuple[float, bytes, float, str, int, dict[str, Any]]:
        async with rig(tmp_path, extra="halt_grace: 1s\n") as r:
            assert r.http is not None and r.engine is not None
            loop = asyncio.get_running_loop()
            node, reader, writer = await connect(r.port_a, "127.0.0.3")
            started = loop.time()
            response = await r.http.post(f"/api/v1/services/a/servers/{node}/halt")
            assert response.status_code == 200, response.text
            halted = await r.server("a", node)
            writer.write(b"ping")
            during = await asyncio.wait_for(reader.readexactly(4), 5)  # within the grace it still works
            eof = await asyncio.wait_for(reader.read(), 5)  # then pacslb closes it
            closed_after = loop.time() - started
            assert eof == b""
            other, _, w = await connect(r.port_a, "127.0.0.3")  # its persistence entry is gone
            w.close()
            entries = (await r.http.get("/api/v1/services/a/persistence")).json()
            return (
                closed_after,
                during,
                halted["halt_closes_in"],
                other if other != node else "",
                entries["total"],
                halted,
            )

    closed_after, during, closes_in, other, entries, halted = run(scenario)
    assert halted["admin"] == "halt" and 0 < closes_in <= 1.0
    assert during == b"ping"
    assert 0.8 <= closed_after < 4.0
    assert other  # re-balanced to another node
    assert entries == 1  # only the new entry, to the other node


def test_online_cancels_a_pending_halt_close(tmp_path: Path) -> None:
    async def scenario() -> bytes:
        async with rig(tmp_path, extra="halt_grace: 1s\n") as r:
            assert r.http is not None
            node, reader, writer = await connect(r.port_a)
            await r.http.post(f"/api/v1/nodes/{node}/halt")
            await r.http.post(f"/api/v1/nodes/{node}/online")
            await asyncio.sleep(1.5)
            writer.write(b"alive")
            data = await asyncio.wait_for(reader.readexactly(5), 5)
            writer.close()
            return data

    assert run(scenario) == b"alive"


def test_unknown_node_service_and_action_get_404_with_a_clear_message(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[int, str]]:
        async with rig(tmp_path) as r:
            assert r.http is not None
            out = []
            for method, path in [
                ("POST", "/api/v1/nodes/pacs9/drain"),
                ("POST", "/api/v1/services/nope/servers/n1/drain"),
                ("POST", "/api/v1/services/b/servers/n3/drain"),
                ("POST", "/api/v1/nodes/n1/reboot"),
                ("GET", "/api/v1/services/nope/persistence"),
            ]:
                response = await r.http.request(method, path)
                out.append((response.status_code, response.json()["detail"]))
            return out

    results = run(scenario)
    assert all(code == 404 for code, _ in results), results
    details = [d for _, d in results]
    assert "no node named 'pacs9'" in details[0] and "n1, n2, n3" in details[0]
    assert "no service named 'nope'" in details[1]
    assert "service 'b' has no server named 'n3'" in details[2]
    assert "unknown action 'reboot'" in details[3]


def test_with_a_token_reads_and_writes_need_it_even_on_loopback(tmp_path: Path) -> None:
    async def scenario() -> dict[str, int]:
        async with rig(tmp_path, token=True) as r:
            base = f"http://127.0.0.1:{r.admin_port}"
            codes = {}
            programs = {"X-Pacslb-Request": "1"}
            async with httpx.AsyncClient(base_url=base, timeout=10, headers=programs) as anonymous:
                for path in ("/api/v1/status", "/api/v1/events", "/api/v1/history", "/api/v1/services/a/persistence",
                             "/metrics", "/healthz", "/", "/static/dashboard.js", "/openapi.json"):  # fmt: skip
                    codes[path] = (await anonymous.get(path)).status_code
                for name, (method, path) in {
                    "drain": ("POST", "/api/v1/nodes/n1/drain"),
                    "server": ("POST", "/api/v1/services/a/servers/n1/halt"),
                    "weight": ("PUT", "/api/v1/nodes/n1/weight"),
                    "reload": ("POST", "/api/v1/reload"),
                    "clear": ("DELETE", "/api/v1/services/a/persistence"),
                }.items():
                    codes[name] = (await anonymous.request(method, path, json={"weight": 2})).status_code
                wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
                codes["wrong"] = (await anonymous.post("/api/v1/nodes/n1/drain", headers=wrong)).status_code
                codes["wrong read"] = (await anonymous.get("/api/v1/status", headers=wrong)).status_code
            assert r.http is not None
            codes["right"] = (await r.http.post("/api/v1/nodes/n1/drain")).status_code
            codes["right read"] = (await r.http.get("/api/v1/services/a/persistence")).status_code
            codes["right metrics"] = (await r.http.get("/metrics")).status_code
            # A page in the operator's browser on another site cannot make writes (CSRF), token or not.
            codes["cross"] = (
                await r.http.post("/api/v1/nodes/n1/online", headers={"Origin": "http://evil.example"})
            ).status_code
            return codes

    codes = run(scenario)
    for name in ("/api/v1/status", "/api/v1/events", "/api/v1/history", "/api/v1/services/a/persistence", "/metrics",
                 "drain", "server", "weight", "reload", "clear", "wrong", "wrong read"):  # fmt: skip
        assert codes[name] == 401, (name, codes)
    for name in ("/healthz", "/", "/static/dashboard.js", "/openapi.json", "right", "right read", "right metrics"):
        assert codes[name] == 200, (name, codes)
    assert codes["cross"] == 403


def test_only_loopback_names_and_the_listener_s_address_are_served_token_or_not(tmp_path: Path) -> None:
    async def scenario(token: bool) -> dict[str, int]:
        async with rig(tmp_path, token=token) as r:
            assert r.http is not None
            port = r.admin_port
            codes = {}
            for host in (f"rebind.evil.example:{port}", f"localhost.evil.example:{port}", f"10.9.9.9:{port}"):
                for path in ("/api/v1/status", "/api/v1/services/a/persistence", "/healthz", "/"):
                    codes[f"{host} {path}"] = (await r.http.get(path, headers={"Host": host})).status_code
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"127.0.0.2:{port}"):
                codes[host] = (await r.http.get("/api/v1/status", headers={"Host": host})).status_code
            return codes

    for token in (False, True):
        codes = run(lambda token=token: scenario(token))  # type: ignore[misc]
        assert {k: v for k, v in codes.items() if "evil" in k or "10.9.9.9" in k} == {
            k: 403 for k in codes if "evil" in k or "10.9.9.9" in k
        }, (token, codes)
        assert [codes[k] for k in codes if "evil" not in k and "10.9.9.9" not in k] == [200] * 4, (token, codes)


def test_no_simple_request_changes_state_without_a_token(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, int], str, str]:
        async with rig(tmp_path) as r:
            assert r.http is not None
            base = f"http://127.0.0.1:{r.admin_port}"
            codes = {}
            async with httpx.AsyncClient(base_url=base, timeout=10) as browser_like:
                halt = "/api/v1/nodes/n1/halt"
                codes["null origin"] = (
                    await browser_like.post(
                        halt, content=b"x", headers={"Origin": "null", "Content-Type": "text/plain"}
                    )
                ).status_code
                codes["text/plain"] = (
                    await browser_like.post(halt, content=b"x", headers={"Content-Type": "text/plain"})
                ).status_code
                codes["form"] = (await browser_like.post(halt, data={"a": "b"})).status_code
                codes["bare"] = (await browser_like.post(halt)).status_code
                codes["delete"] = (await browser_like.delete("/api/v1/services/a/persistence")).status_code
                codes["evil json"] = (
                    await browser_like.post(halt, json={}, headers={"Origin": "http://evil.example"})
                ).status_code
                untouched = (await r.server("a", "n1"))["admin"]
                codes["json"] = (await browser_like.post("/api/v1/nodes/n1/drain", json={})).status_code
            after = (await r.server("a", "n1"))["admin"]
            codes["header"] = (await r.http.post("/api/v1/nodes/n1/online")).status_code
            return codes, untouched, after

    codes, untouched, after = run(scenario)
    assert codes == {"null origin": 403, "text/plain": 415, "form": 415, "bare": 415, "delete": 415,
                     "evil json": 403, "json": 200, "header": 200}  # fmt: skip
    assert untouched == "online" and after == "drain"


def test_weights_persistence_listing_and_clearing(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        async with rig(tmp_path) as r:
            assert r.http is not None
            out: dict[str, Any] = {}
            weight = await r.http.put("/api/v1/services/b/servers/n2/weight", json={"weight": 0})
            out["weight"] = weight.json()
            out["nodes_b"] = set()
            for _ in range(4):
                node, _, w = await connect(r.port_b)
                out["nodes_b"].add(node)
                w.close()
            out["bad_weight"] = (await r.http.put("/api/v1/nodes/n1/weight", json={"weight": 999})).status_code
            await r.http.put("/api/v1/services/b/servers/n2/weight", json={"weight": None})
            out["back"] = (await r.server("b", "n2"))["weight"]
            for i in range(3):
                _, _, w = await connect(r.port_a, f"127.0.2.{i + 1}")
                w.close()
            await asyncio.sleep(0.2)
            listing = (await r.http.get("/api/v1/services/a/persistence")).json()
            out["listing"] = listing
            one = listing["entries"][0]
            out["forget_one"] = (
                await r.http.delete("/api/v1/services/a/persistence", params={"key": one["key"]})
            ).json()
            out["clear_rest"] = (await r.http.delete("/api/v1/services/a/persistence")).json()
            out["after"] = (await r.http.get("/api/v1/services/a/persistence")).json()["total"]
            out["none_table"] = (await r.http.get("/api/v1/services/b/persistence")).json()
            return out

    out = run(scenario)
    assert out["weight"] == {"node": "n2", "weight": 0, "services": ["b"]}
    assert out["nodes_b"] == {"n1"}
    assert out["bad_weight"] == 422
    assert out["back"] == 1
    listing = out["listing"]
    assert listing["total"] == 3 and {e["key"] for e in listing["entries"]} == {"127.0.2.1", "127.0.2.2", "127.0.2.3"}
    assert all(e["active"] == 0 and e["expires_in"] > 0 for e in listing["entries"])
    assert out["forget_one"] == {"removed": 1} and out["clear_rest"] == {"removed": 2} and out["after"] == 0
    assert out["none_table"]["total"] == 0


def test_reload_through_the_api_applies_or_refuses_with_the_errors(tmp_path: Path) -> None:
    async def scenario() -> tuple[Any, int, Any, int]:
        async with rig(tmp_path) as r:
            assert r.http is not None
            r.path.write_text(r.config(b_weight=3))
            ok = await r.http.post("/api/v1/reload")
            applied = (ok.json(), (await r.server("b", "n2"))["weight"])
            r.path.write_text(r.config().replace("balance: roundrobin", "balance: fastest", 1))
            bad = await r.http.post("/api/v1/reload")
            return applied, bad.status_code, bad.json(), (await r.server("b", "n2"))["weight"]

    (answer, weight), bad_code, bad, weight_after = run(scenario)
    assert answer == {"applied": True, "errors": []} and weight == 3
    assert bad_code == 422 and bad["applied"] is False
    assert any("services.a.balance" in e for e in bad["errors"]), bad
    assert weight_after == 3  # the running config stays


def test_admin_states_survive_reload_and_restart(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[str], list[str], dict[str, Any]]:
        async with rig(tmp_path) as r:
            assert r.http is not None and r.engine is not None
            await r.http.post("/api/v1/nodes/n2/drain")
            await r.http.post("/api/v1/services/a/servers/n3/halt")
            await r.http.put("/api/v1/services/b/servers/n1/weight", json={"weight": 5})
            await r.http.post("/api/v1/reload")
            after_reload = [
                (await r.server("a", "n2"))["admin"], (await r.server("b", "n2"))["admin"],
                (await r.server("a", "n3"))["admin"], str((await r.server("b", "n1"))["weight"]),
            ]  # fmt: skip
            # A restart: a new engine from the same config and state file.
            await r.engine.shutdown(grace=1)
            r.engine = Engine(load_config(r.path), str(r.path))
            await r.engine.start()
            after_restart = [
                (await r.server("a", "n2"))["admin"], (await r.server("b", "n2"))["admin"],
                (await r.server("a", "n3"))["admin"], str((await r.server("b", "n1"))["weight"]),
            ]  # fmt: skip
            return after_reload, after_restart, json.loads((tmp_path / "state.json").read_text())

    after_reload, after_restart, state = run(scenario)
    assert after_reload == ["drain", "drain", "halt", "5"]
    assert after_restart == after_reload
    assert state["nodes"] == {"n2": {"admin": "drain"}}
    assert state["servers"] == {"a/n3": {"admin": "halt"}, "b/n1": {"weight": 5}}


def test_fate_sharing_takes_a_node_out_of_every_service(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        check = "{type: tcp, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}"
        async with rig(tmp_path, extra="fate_sharing: true\n") as r:
            assert r.http is not None
            r.path.write_text(r.config().replace("check: {type: none}", f"check: {check}", 1))
            assert (await r.http.post("/api/v1/reload")).json()["applied"]
            r.backends["a1"].close()  # n1's port in service a dies; in b it still answers
            await r.backends["a1"].wait_closed()
            for _ in range(50):
                await asyncio.sleep(0.1)
                b_n1 = await r.server("b", "n1")
                if b_n1["health"] == "down":
                    break
            a_n1 = await r.server("a", "n1")
            nodes = set()
            for _ in range(4):
                node, _, w = await connect(r.port_b)
                nodes.add(node)
                w.close()
            status = (await r.http.get("/api/v1/status")).json()
            return a_n1, b_n1, {"nodes": nodes, "n1": next(n for n in status["nodes"] if n["name"] == "n1")}

    a_n1, b_n1, seen = run(scenario)
    assert a_n1["health"] == "down" and a_n1["down_via"] is None
    assert b_n1["health"] == "down" and b_n1["down_via"] == "a"
    assert seen["nodes"] == {"n2"}
    assert seen["n1"]["health"] == "down"
