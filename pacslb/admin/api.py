"""The admin HTTP API, the dashboard's files and /metrics, served by uvicorn inside pacslb's event loop.

What this module owns: the HTTP contract of operations (docs/operations.md; tests outside this repository
rely on it), authentication, and running the admin listener. It turns requests into calls on the running
balancer (``nodes.set_admin``, ``nodes.set_weight``, ``reload``; what it sees of it is balancer.py's
protocol) and reads state through status.py and metrics.py; it decides nothing about traffic itself.
Every endpoint is ``async def`` so it runs on the event loop that owns the balancer's state, never in a
worker thread.

Endpoints (JSON unless said otherwise; the OpenAPI document is at /openapi.json):
    GET  /                                            the dashboard (HTML; its files under /static/)
    GET  /api/v1/status                               every service, server and node
    POST /api/v1/nodes/{node}/{action}                online | drain | halt, in every service
    POST /api/v1/services/{service}/servers/{node}/{action}   the same, in one service
    PUT  /api/v1/nodes/{node}/weight                  {"weight": N or null}; also per service
    GET|DELETE /api/v1/services/{service}/persistence list / clear persistence entries
    POST /api/v1/reload                               reload the config file
    POST /api/v1/cluster/role                         {"role": "master"}: keepalived's report (pacslb role)
    GET  /api/v1/events, /api/v1/history              recent events; throughput samples for the graphs
    GET  /metrics                                     Prometheus text format
    GET  /healthz                                     "the balancer's loop answers and is not degraded" (keepalived)

Security (docs/operations.md, "Who may do what"). Every request, token or not, first passes guard.py:
a ``Host`` other than a loopback address, ``localhost`` or the listener's own address is a 403 (DNS
rebinding); a write (POST, PUT, DELETE) needs ``Content-Type: application/json`` or ``X-Pacslb-Request``
(415) and is refused with a foreign or ``null`` ``Origin`` (403). With ``admin.token_file``, every write
and every read of the balancer's state (/api/v1/*, /metrics: they name clients, AE titles and node
addresses) needs ``Authorization: Bearer TOKEN`` (compared in constant time; 401 otherwise), from
loopback too. Open to all: /healthz, the dashboard's files (they hold no data: the page asks for the
token) and /openapi.json. Without a token, all of it is open to whoever can connect, and the start says so
in a warning (``admin_no_token``). Idle connections are bounded by connections.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from pacslb import __version__
from pacslb.admin import guard
from pacslb.admin.connections import ADMIN_IDLE_TIMEOUT, ADMIN_MAX_CONNECTIONS, AdminProtocol
from pacslb.admin.history import History
from pacslb.admin.metrics import CONTENT_TYPE_LATEST, make_registry, render
from pacslb.admin.state import ADMIN_STATES, NotFound
from pacslb.admin.status import build_status
from pacslb.cluster.role import ReportedRole, Role
from pacslb.config.model import MAX_WEIGHT, AdminSpec
from pacslb.logs import log_event

if TYPE_CHECKING:
    from pacslb.admin.balancer import Balancer

log = logging.getLogger("pacslb.admin")

STATIC = Path(__file__).with_name("static")
#: uvicorn is ready within milliseconds of being given its socket; past this something is wrong.
ADMIN_START_TIMEOUT = 5.0
#: On stop or when the listener moves, requests in flight may finish for this long.
ADMIN_STOP_TIMEOUT = 2.0
#: Idle keep-alive connections are closed after this: a dashboard polls every 2 s and keeps its own. (The
#: connection limits, and the same bound before a first request, are in connections.py.)
ADMIN_KEEP_ALIVE = int(ADMIN_IDLE_TIMEOUT)
#: Persistence entries listed per request (a table holds up to 10 million; the total is always given).
MAX_LISTED_ENTRIES = 1000
Action = Literal["online", "drain", "halt"]


# -- the documents (also the OpenAPI schema) --------------------------------------------------------------


class CheckStatus(BaseModel):
    type: str
    ok: bool | None = Field(description="result of the last check; null before the first")
    reason: str
    duration: float | None = Field(description="seconds the last check took")
    at: float | None = Field(description="when the last check ran (seconds since the epoch)")


class ServerStatus(BaseModel):
    name: str = Field(description="the node's name")
    address: str
    health: Literal["up", "down"]
    admin: Action
    weight: int
    active: int = Field(description="open connections")
    total: int = Field(description="connections given since start")
    bytes_up: int = Field(description="bytes from clients to the node, of ended connections")
    bytes_down: int = Field(description="bytes from the node to clients, of ended connections")
    down_via: str | None = Field(description="fate sharing: the service whose check took the node out")
    check: CheckStatus | None
    clock_skew: float | None = Field(description="seconds the node's clock is off, when over the limit")
    halt_closes_in: float | None = Field(description="seconds until a halted server's connections are closed")


class ServiceStatus(BaseModel):
    name: str
    mode: str
    listen: str
    balance: str
    persistence: str
    persistence_entries: int
    check: str
    state: Literal["up", "down"] = Field(description="down: no server can take a new client")
    usable: int
    active: int
    total: int
    rejections: dict[str, int]
    servers: list[ServerStatus]


class NodeStatus(BaseModel):
    name: str
    services: list[str]
    admin: Literal["online", "drain", "halt", "mixed"]
    health: Literal["up", "down", "partial"]
    clock_skew: float | None


class StoreStatus(BaseModel):
    kind: str = Field(description="memory, redis, rediss or sentinel")
    connected: bool
    synced: bool = Field(description="every binding in the store has been read since the last (re)connection")
    starting: bool = Field(False, description="just started, not synced yet: /healthz answers 503 meanwhile")
    url: str | None = None
    down_since: float | None = None
    last_error: str = ""
    pending: int = 0
    written: int = 0
    applied: int = Field(0, description="bindings made by other balancers applied here")
    published: int = 0
    conflicts_lost: int = 0
    reconnects: int = 0


class ClusterStatus(BaseModel):
    node: str = Field(description="this balancer's name in the cluster")
    store: StoreStatus


class Status(BaseModel):
    version: str
    now: float
    started_at: float
    reloaded_at: float | None
    config: str | None
    fate_sharing: bool
    halt_grace: float
    token_required: bool
    role: Role = Field(description="what keepalived last reported: unknown until it does (pacslb role)")
    role_since: float | None = Field(description="when the role last changed (seconds since the epoch)")
    vrrp: bool = Field(description="cluster.vrrp is configured: keepalived is expected to report a role")
    services: list[ServiceStatus]
    nodes: list[NodeStatus]
    cluster: ClusterStatus
    last_event: int


class ActionResult(BaseModel):
    node: str
    action: Action
    services: list[str] = Field(description="the services the node was set in")
    message: str


class WeightBody(BaseModel):
    weight: int | None = Field(ge=0, le=MAX_WEIGHT, description="null: back to the config's weight")


class WeightResult(BaseModel):
    node: str
    weight: int | None
    services: list[str]


class PersistenceEntry(BaseModel):
    key: str = Field(description="the client: its (masked) address, calling AE title, ...")
    server: str
    active: int = Field(description="the client's open connections")
    expires_in: float | None = Field(description="seconds left; null while a connection is open")


class PersistenceList(BaseModel):
    service: str
    total: int
    entries: list[PersistenceEntry]


class Removed(BaseModel):
    removed: int


class RoleBody(BaseModel):
    role: ReportedRole


class RoleResult(BaseModel):
    node: str
    role: ReportedRole
    changed: bool = Field(description="false: keepalived reported the role this balancer already had")


class ReloadResult(BaseModel):
    applied: bool
    errors: list[str]


class EventModel(BaseModel):
    id: int
    at: float
    kind: str
    level: str
    message: str
    fields: dict[str, Any]


class EventList(BaseModel):
    events: list[EventModel]


class Problem(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem}, 415: {"model": Problem},
}  # fmt: skip


# -- the server -------------------------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the engine handles signals, in one place."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class AdminServer:
    """The admin listener of one engine."""

    def __init__(self, engine: Balancer, spec: AdminSpec, sock: socket.socket, history: History | None = None) -> None:
        self.engine = engine
        self.sock = sock
        self.spec = spec
        self.token: str | None = None
        self.history = history or History(self._servers)
        self.registry = make_registry(engine)
        self.configure(spec)
        self.app = create_app(self)
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    def _servers(self) -> list[tuple[str, Any]]:
        return [(name, s) for name, svc in self.engine.services.items() for s in svc.servers]

    def configure(self, spec: AdminSpec) -> None:
        """Take the admin section of a (re)loaded config: the token is read again."""
        self.spec = spec
        self.token = None
        if spec.token_file is not None:
            try:
                with open(spec.token_file, encoding="utf-8") as handle:
                    self.token = handle.readline().strip()
            except OSError as exc:
                # Fail closed: a token nobody knows, so that every write is refused until it is fixed.
                self.token = secrets.token_hex(32)
                log_event(log, "token_unreadable", logging.ERROR, file=spec.token_file, reason=str(exc))
        else:
            log_event(
                log, "admin_no_token", logging.WARNING, address=str(spec.listen),
                detail="admin.token_file is not set: whoever can connect to this address (any local user or "
                "process) can read client addresses and AE titles and drain or halt nodes",
            )  # fmt: skip

    @property
    def reads_need_token(self) -> bool:
        """With a token, reads of the balancer's state need it too, from loopback as from anywhere."""
        return self.token is not None

    def authorized(self, credentials: HTTPAuthorizationCredentials | None) -> bool:
        if self.token is None:
            return True
        given = credentials.credentials if credentials is not None else ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """Why a request must be refused before routing (guard.py: foreign Host, cross-origin or simple
        write), or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        local = scope.get("server")
        found = guard.refusal(
            scope.get("method", ""), headers, self.spec.listen.host, local[0] if local else None, self.spec.hosts
        )
        return None if found is None else (found.status, found.detail)

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            ws="none",
            http=AdminProtocol,
            timeout_keep_alive=ADMIN_KEEP_ALIVE,
            limit_concurrency=ADMIN_MAX_CONNECTIONS,
            timeout_graceful_shutdown=int(ADMIN_STOP_TIMEOUT),
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self.sock]), name="admin")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ADMIN_START_TIMEOUT
        while not self._server.started and not self._task.done() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if not self._server.started:
            self._task.cancel()
            log_event(log, "admin_failed", logging.ERROR, address=str(self.spec.listen), reason="did not start")
            return
        self.history.start()

    async def stop(self, keep_history: bool = False) -> None:
        if not keep_history:
            await self.history.stop()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            task = self._task
            try:
                done, _ = await asyncio.wait([task], timeout=ADMIN_STOP_TIMEOUT + 1.0)
            finally:
                if not task.done():  # it did not stop in time, or the stop itself is being cancelled
                    task.cancel()
            if done and not task.cancelled() and task.exception() is not None:
                log.error("admin listener stopped with an error", exc_info=task.exception())
        self.sock.close()


class _Guard:
    """ASGI middleware: refuses foreign Host names and cross-origin or simple writes before any routing."""

    def __init__(self, app: ASGIApp, server: AdminServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.server.refusal(scope)
            if problem is not None:
                await JSONResponse({"detail": problem[1]}, status_code=problem[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: AdminServer) -> FastAPI:
    """The FastAPI application of one admin server."""
    engine = server.engine
    bearer = HTTPBearer(auto_error=False, description="the token in admin.token_file")
    app = FastAPI(
        title="pacslb admin API",
        version=__version__,
        description="Operate a pacslb load balancer: status, admin states, weights, persistence, reload.",
        docs_url=None,  # the interactive docs load scripts from a CDN; pacslb serves nothing it does not ship
        redoc_url=None,
    )
    app.add_middleware(_Guard, server=server)

    async def read_access(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if server.reads_need_token and not server.authorized(credentials):
            raise HTTPException(401, "this needs Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})

    async def write_access(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if not server.authorized(credentials):
            raise HTTPException(
                401, "this needs Authorization: Bearer TOKEN (the token of admin.token_file)",
                {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    reads = [Depends(read_access)]
    writes = [Depends(write_access)]

    def action_of(action: str) -> Action:
        if action not in ADMIN_STATES:
            raise HTTPException(404, f"unknown action {action!r} (actions: {', '.join(ADMIN_STATES)})")
        return action

    def acting(node: str, action: str, service: str | None) -> ActionResult:
        state = action_of(action)
        try:
            services = engine.nodes.set_admin(node, state, service)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        return ActionResult(
            node=node, action=state, services=services, message=f"{node}: {state} in {', '.join(services)}"
        )

    def weighing(node: str, body: WeightBody, service: str | None) -> WeightResult:
        try:
            services = engine.nodes.set_weight(node, body.weight, service)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        return WeightResult(node=node, weight=body.weight, services=services)

    def table_of(service: str) -> Any:
        found = engine.services.get(service)
        if found is None:
            raise HTTPException(404, f"no service named {service!r} (services: {', '.join(engine.services)})")
        return found.table

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", tags=["status"], responses={503: {"description": "the balancer is degraded"}})
    async def healthz() -> JSONResponse:
        """200 ``{"ok": true}`` while the balancer's event loop runs; 503 ``{"ok": false, "reason": ...}``
        while it is degraded (it ran out of file descriptors in the last 10 s), so that keepalived moves the
        virtual IP to a balancer that can serve."""
        from pacslb.descriptors import health

        body = health()
        if body["ok"] and engine.store.status().get("starting"):
            # Just started, the shared table not read yet (for at most a few seconds): not ready to take
            # the virtual IP (pacslb/state/redis.py, SYNC_GRACE).
            body = {"ok": False, "reason": "store_not_synced", "detail": "reading the shared table"}
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get("/api/v1/status", response_model=Status, dependencies=reads, tags=["status"])
    async def status() -> dict[str, Any]:
        """Every service with its servers, and every node across services."""
        return build_status(engine)

    @app.get("/api/v1/events", response_model=EventList, dependencies=reads, tags=["status"])
    async def events(after: int = Query(0, ge=0, description="only events with a larger id")) -> dict[str, Any]:
        """Recent events (health, admin, service, reload), oldest first."""
        return {"events": [e.to_json() for e in engine.events.since(after)]}

    @app.get("/api/v1/history", dependencies=reads, tags=["status"])
    async def history() -> dict[str, Any]:
        """Per server: bytes per second each way and open connections, sampled over the last hour."""
        return server.history.rates()

    @app.post("/api/v1/nodes/{node}/{action}", response_model=ActionResult, responses=ERRORS, dependencies=writes,
              tags=["admin"])  # fmt: skip
    async def node_action(node: str, action: str) -> ActionResult:
        """Set a node online, in drain or in halt, in every service it is in."""
        return acting(node, action, None)

    @app.post("/api/v1/services/{service}/servers/{node}/{action}", response_model=ActionResult, responses=ERRORS,
              dependencies=writes, tags=["admin"])  # fmt: skip
    async def server_action(service: str, node: str, action: str) -> ActionResult:
        """Set a node online, in drain or in halt, in one service."""
        return acting(node, action, service)

    @app.put("/api/v1/nodes/{node}/weight", response_model=WeightResult, responses=ERRORS, dependencies=writes,
             tags=["admin"])  # fmt: skip
    async def node_weight(node: str, body: WeightBody) -> WeightResult:
        """Give a node a weight in every service (null: the config's weight again). Kept across reloads."""
        return weighing(node, body, None)

    @app.put("/api/v1/services/{service}/servers/{node}/weight", response_model=WeightResult, responses=ERRORS,
             dependencies=writes, tags=["admin"])  # fmt: skip
    async def server_weight(service: str, node: str, body: WeightBody) -> WeightResult:
        """Give a node a weight in one service (null: the config's weight again)."""
        return weighing(node, body, service)

    @app.get("/api/v1/services/{service}/persistence", response_model=PersistenceList, responses=ERRORS,
             dependencies=reads, tags=["persistence"])  # fmt: skip
    async def persistence(
        service: str,
        server_name: str | None = Query(None, alias="server", description="only entries of this node"),
        limit: int = Query(MAX_LISTED_ENTRIES, ge=1, le=MAX_LISTED_ENTRIES),
    ) -> PersistenceList:
        """The service's persistence entries, most recently used first."""
        table = table_of(service)
        if table is None:
            return PersistenceList(service=service, total=0, entries=[])
        now = asyncio.get_running_loop().time()
        items = [(k, e) for k, e in table.items() if server_name is None or e.server == server_name]
        entries = [
            PersistenceEntry(
                key=key,
                server=entry.server,
                active=entry.active,
                expires_in=None if entry.released_at is None else max(0.0, table.timeout - (now - entry.released_at)),
            )
            for key, entry in reversed(items[-limit:])
        ]
        return PersistenceList(service=service, total=len(items), entries=entries)

    @app.delete("/api/v1/services/{service}/persistence", response_model=Removed, responses=ERRORS,
                dependencies=writes, tags=["persistence"])  # fmt: skip
    async def clear_persistence(
        service: str,
        server_name: str | None = Query(None, alias="server", description="only entries of this node"),
        key: str | None = Query(None, description="only this client's entry"),
    ) -> Removed:
        """Forget persistence entries: one client's, one node's, or all of the service."""
        table = table_of(service)
        if table is None:
            return Removed(removed=0)
        if key is not None:
            before = len(table)
            table.forget(key)
            removed = before - len(table)
        elif server_name is not None:
            removed = table.drop_server(server_name)
        else:
            keys = [k for k, _ in table.items()]
            for k in keys:
                table.forget(k)
            removed = len(keys)
        log_event(log, "persistence_cleared", service=service, server=server_name or "-", key=key or "-",
                  removed=removed)  # fmt: skip
        return Removed(removed=removed)

    @app.post("/api/v1/cluster/role", response_model=RoleResult, responses=ERRORS, dependencies=writes,
              tags=["cluster"])  # fmt: skip
    async def cluster_role(body: RoleBody) -> RoleResult:
        """Tell this balancer its role, as keepalived's notify hooks do (``pacslb role CONFIG ROLE``): shown in
        the status, the dashboard and the metrics, logged (``role``) when it changes. Traffic is unaffected."""
        node = engine.config.cluster.node
        changed = engine.role.set(body.role, node, by="api")
        return RoleResult(node=node, role=body.role, changed=changed)

    @app.post("/api/v1/reload", response_model=ReloadResult, dependencies=writes, tags=["admin"],
              responses={409: {"model": ReloadResult}, 422: {"model": ReloadResult}})  # fmt: skip
    async def reload() -> JSONResponse:
        """Reload the config file, as SIGHUP does. An invalid file is refused with its errors (422)."""
        applied = await engine.reload()
        body = ReloadResult(applied=applied, errors=engine.reload_errors).model_dump()
        if applied:
            return JSONResponse(body)
        return JSONResponse(body, status_code=409 if engine.config_path is None else 422)

    @app.get("/metrics", dependencies=reads, tags=["status"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(render(server.registry), media_type=CONTENT_TYPE_LATEST)

    return app
