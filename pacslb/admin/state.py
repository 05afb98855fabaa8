"""Admin states and run-time weights, as an operator set them, and the file that keeps them.

What this module owns: which admin state (online | drain | halt) and which run-time weight each node has,
for every service or for one, and writing that to ``admin.state_file`` so it survives a restart. It never
touches a running server: the engine applies what is recorded here (on a change, on reload, at start).

Precedence: a setting for one service (``dicom/pacs2``) wins over the node-wide one (``pacs2``), which
wins over the default (online, the config's weight). Setting a node-wide state clears that node's
per-service ones, so "online pacs2" really puts pacs2 back everywhere.

The file is JSON, written atomically (a temporary file renamed over the old one), so a crash while
writing leaves the previous state, never half of one. A file that cannot be read is logged and ignored:
pacslb starts with every node online rather than not at all.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, cast, get_args

from pacslb.balance.server import AdminState
from pacslb.config.model import MAX_WEIGHT
from pacslb.errors import PacslbError
from pacslb.logs import log_event

log = logging.getLogger("pacslb.admin")

ADMIN_STATES: tuple[AdminState, ...] = get_args(AdminState)
#: Format version of the state file, so that a later pacslb can read (or knowingly refuse) an older one.
STATE_FILE_VERSION = 1
#: The file holds a few lines per node; anything bigger is not ours.
MAX_STATE_FILE_BYTES = 1024 * 1024


class NotFound(PacslbError):
    """An admin operation named a node, service or action that does not exist (the API's 404)."""


@dataclass(slots=True)
class Setting:
    """What an operator set for a node (everywhere) or for one server (node in one service)."""

    admin: AdminState | None = None  # None: not set here (falls through to the node-wide / default)
    weight: int | None = None  # None: the config's weight

    def empty(self) -> bool:
        return self.admin is None and self.weight is None


@dataclass
class AdminStates:
    """The operator's settings, keyed by node ("pacs2") and by service and node ("dicom", "pacs2")."""

    path: str | None = None
    nodes: dict[str, Setting] = field(default_factory=dict)
    servers: dict[tuple[str, str], Setting] = field(default_factory=dict)

    # -- reading ----------------------------------------------------------------------------------------

    def admin(self, service: str, node: str) -> AdminState:
        """The admin state a server should have."""
        for setting in (self.servers.get((service, node)), self.nodes.get(node)):
            if setting is not None and setting.admin is not None:
                return setting.admin
        return "online"

    def weight(self, service: str, node: str) -> int | None:
        """The run-time weight a server should have, or None for the config's."""
        for setting in (self.servers.get((service, node)), self.nodes.get(node)):
            if setting is not None and setting.weight is not None:
                return setting.weight
        return None

    # -- changing ---------------------------------------------------------------------------------------

    def set_admin(self, node: str, state: AdminState, service: str | None = None) -> None:
        if service is None:
            for key in [k for k in self.servers if k[1] == node]:
                self._set(self.servers, key, admin=None)
            self._set(self.nodes, node, admin=None if state == "online" else state)
        else:
            node_wide = self.nodes.get(node)
            inherited = node_wide.admin if node_wide is not None and node_wide.admin is not None else "online"
            self._set(self.servers, (service, node), admin=None if state == inherited else state)
        self.save()

    def set_weight(self, node: str, weight: int | None, service: str | None = None) -> None:
        if service is None:
            for key in [k for k in self.servers if k[1] == node]:
                self._set(self.servers, key, weight=None)
            self._set(self.nodes, node, weight=weight)
        else:
            self._set(self.servers, (service, node), weight=weight)
        self.save()

    @staticmethod
    def _set(table: dict[Any, Setting], key: Any, **values: Any) -> None:
        setting = table.get(key) or Setting()
        for name, value in values.items():
            setattr(setting, name, value)
        if setting.empty():
            table.pop(key, None)
        else:
            table[key] = setting

    # -- sharing with the other balancers (pacslb/state/redis.py) ---------------------------------------

    def fields(self) -> dict[str, dict[str, Any]]:
        """Every setting as a flat mapping: ``nodes/NODE`` or ``servers/SERVICE/NODE`` -> its values."""
        document = self.to_json()
        out = {f"nodes/{node}": value for node, value in document["nodes"].items()}
        out.update({f"servers/{name}": value for name, value in document["servers"].items()})
        return out

    @staticmethod
    def changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """What differs from ``before`` to ``after`` (a setting gone: ``{}``)."""
        out = {name: value for name, value in after.items() if before.get(name) != value}
        out.update({name: {} for name in before if name not in after})
        return out

    def apply_fields(self, changes: dict[str, dict[str, Any]]) -> None:
        """Take settings made elsewhere (as :meth:`fields` gives them; ``{}`` clears one), then save.

        Raises:
            ValueError: a name or a value that is not a setting (nothing is changed then).
        """
        parsed: list[tuple[str, Any, Setting]] = []
        for name, value in changes.items():
            kind, sep, rest = name.partition("/")
            setting = _setting(value)
            if kind == "nodes" and sep and rest:
                parsed.append(("nodes", rest, setting))
            elif kind == "servers" and "/" in rest:
                service, _, node = rest.partition("/")
                parsed.append(("servers", (service, node), setting))
            else:
                raise ValueError(f"not a setting: {name!r}")
        for kind, key, setting in parsed:
            table: dict[Any, Setting] = self.nodes if kind == "nodes" else self.servers
            self._set(table, key, admin=setting.admin, weight=setting.weight)
        self.save()

    # -- the file ---------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        def one(setting: Setting) -> dict[str, Any]:
            return {k: v for k, v in (("admin", setting.admin), ("weight", setting.weight)) if v is not None}

        return {
            "version": STATE_FILE_VERSION,
            "nodes": {node: one(s) for node, s in sorted(self.nodes.items())},
            "servers": {f"{svc}/{node}": one(s) for (svc, node), s in sorted(self.servers.items())},
        }

    def save(self) -> None:
        """Write the file (when there is one). A failure is logged: the running state is still right."""
        if self.path is None:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, temporary = tempfile.mkstemp(prefix=".pacslb-state-", dir=folder)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(self.to_json(), handle, indent=1)
                    handle.write("\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:
            log_event(log, "state_file_error", logging.ERROR, file=self.path, reason=exc.strerror or str(exc))

    @classmethod
    def load(cls, path: str | None) -> AdminStates:
        """The settings kept in ``path``; empty when there is no file yet, or it cannot be used (logged)."""
        states = cls(path)
        if path is None or not os.path.exists(path):
            return states
        try:
            with open(path, "rb") as handle:
                raw = handle.read(MAX_STATE_FILE_BYTES + 1)
            if len(raw) > MAX_STATE_FILE_BYTES:
                raise ValueError(f"larger than {MAX_STATE_FILE_BYTES} bytes")
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != STATE_FILE_VERSION:
                raise ValueError(f"not a version {STATE_FILE_VERSION} pacslb state file")
            for node, value in dict(data.get("nodes", {})).items():
                states.nodes[str(node)] = _setting(value)
            for name, value in dict(data.get("servers", {})).items():
                service, sep, node = str(name).partition("/")
                if not sep:
                    raise ValueError(f"server key {name!r} is not SERVICE/NODE")
                states.servers[(service, node)] = _setting(value)
        except (OSError, ValueError, TypeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log_event(log, "state_file_ignored", logging.ERROR, file=path, reason=reason)
            return cls(path)
        return states


def _setting(value: Any) -> Setting:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {value!r}")
    admin = value.get("admin")
    weight = value.get("weight")
    if admin is not None and admin not in ADMIN_STATES:
        raise ValueError(f"unknown admin state {admin!r}")
    if weight is not None and (
        not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT
    ):
        raise ValueError(f"weight {weight!r} is not 0..{MAX_WEIGHT}")
    return Setting(cast("AdminState | None", admin), weight)
