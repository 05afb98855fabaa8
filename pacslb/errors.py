"""The pacslb error tree.

Every error pacslb raises on purpose derives from :class:`PacslbError`. Lower-level exceptions
(``OSError``, ``yaml.YAMLError``, pydantic's ``ValidationError``) are mapped onto this tree at the
boundary where they occur, with ``raise ... from exc``. Anything else reaching a connection handler is a
bug: it is logged with its traceback and only that connection is closed.

    PacslbError
    ├── ConfigError          the config cannot be used; carries every problem found (file:line: field: reason)
    └── ConnectFailed        connecting to a node failed or timed out (or its TLS handshake failed)
"""

from __future__ import annotations

from dataclasses import dataclass


class PacslbError(Exception):
    """Base of every error pacslb raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, located as precisely as the file allows."""

    file: str
    line: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class ConfigError(PacslbError):
    """The config cannot be used. ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class ConnectFailed(PacslbError):
    """Connecting to a node failed (refused, unreachable), timed out, or its TLS handshake failed."""

    def __init__(self, server: str, reason: str) -> None:
        self.server = server
        self.reason = reason
        super().__init__(f"{server}: {reason}")
