"""Loading a YAML config into :class:`~pacslb.config.model.Config`, collecting every problem at once.

Theory of operation: the YAML text is composed into a node tree (which knows line numbers), turned into
plain Python data while recording the line of every mapping key and sequence item by its path, then
validated by pydantic. Every validation error, and every cross-field rule of
:func:`~pacslb.config.model.semantic_issues`, is reported as ``file:line: path.to.field: reason``, the line
being that of the deepest part of the path present in the file. Nothing here exits or prints: the CLI does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pacslb.config.model import Config, Issue, ServiceSpec, semantic_issues
from pacslb.errors import ConfigError, ConfigIssue

#: A config is a few KB; refusing anything huge keeps `pacslb check` of a wrong file quick and harmless.
MAX_CONFIG_BYTES = 4 * 1024 * 1024

Path_ = tuple[str | int, ...]

#: The tags plain YAML resolves to; anything else (!!python/..., !custom, !!binary, !!timestamp) is refused.
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in ("map", "seq", "str", "int", "float", "bool", "null"))


class _Located:
    """Plain data from a YAML node tree plus the line of every path in it."""

    def __init__(self) -> None:
        self.lines: dict[Path_, int] = {}
        self.problems: list[tuple[Path_, int, str]] = []
        self._scalar_loader = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if node.tag not in _PLAIN_TAGS:
            self.problems.append((path, node.start_mark.line + 1, f"YAML tag {node.tag!r} is not supported"))
            return None
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self.problems.append(
                        ((*path, "<<"), key_node.start_mark.line + 1, "YAML merge keys are not supported")
                    )
                    continue
                key = self.build_scalar(key_node, path)
                if not isinstance(key, str | int) or isinstance(key, bool):
                    self.problems.append((path, key_node.start_mark.line + 1, f"key {key!r} is not a name"))
                    continue
                key = str(key)
                if key in result:
                    self.problems.append(
                        (
                            (*path, key),
                            key_node.start_mark.line + 1,
                            f"duplicate key (first given on line {self.lines[(*path, key)]})",
                        )
                    )
                    continue
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.build_scalar(node, path)

    def build_scalar(self, node: yaml.Node, path: Path_) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return None  # a mapping or list used as a key
        if node.tag not in _PLAIN_TAGS:
            self.problems.append((path, node.start_mark.line + 1, f"YAML tag {node.tag!r} is not supported"))
            return None
        try:
            return self._scalar_loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            self.problems.append((path, node.start_mark.line + 1, f"{node.value!r} does not fit its YAML tag: {exc}"))
            return None

    def line_of(self, path: Path_) -> int | None:
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


def _reason(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    message = str(error.get("msg", "invalid"))
    return message.removeprefix("Value error, ")


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def load_config_text(text: str, filename: str = "<config>") -> Config:
    """Parse and validate a config given as text.

    Raises:
        ConfigError: with every problem found, each naming file, line and field.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(filename, line, "", f"not valid YAML: {problem}")]) from exc
    if root is None:
        raise ConfigError([ConfigIssue(filename, 1, "", "the file is empty (it needs at least 'services')")])
    located = _Located()
    data = located.build(root, ())
    issues: list[ConfigIssue] = [
        ConfigIssue(filename, line, _dotted(path), reason) for path, line, reason in located.problems
    ]
    if not isinstance(data, dict):
        issues.append(ConfigIssue(filename, 1, "", "the top level must be a mapping (with at least 'services')"))
        raise ConfigError(issues)

    found: list[Issue] = []
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            found.append((tuple(error["loc"]), _reason(dict(error))))

    services = data.get("services")
    valid_services: dict[str, ServiceSpec] = {}
    if isinstance(services, dict):
        for name, raw in services.items():
            service, dropped = _validate_leniently(raw)
            if service is not None:
                valid_services[name] = service
                found.extend(semantic_issues(name, service, raw, dropped))
    found.extend(_listen_conflicts(valid_services))

    # A value YAML itself could not give is reported once, not again by validation.
    broken = {path for path, _, _ in located.problems}
    issues.extend(
        ConfigIssue(filename, located.line_of(path), _dotted(path), reason)
        for path, reason in found
        if not any(path[: len(b)] == b for b in broken)
    )
    if issues:
        issues.sort(key=lambda i: (i.line or 0, i.field))
        raise ConfigError(issues)
    assert config is not None
    return config


def _validate_leniently(raw: Any) -> tuple[ServiceSpec | None, frozenset[str]]:
    """Validate one service, leaving out the parts already reported as invalid, so that the rules relating
    its valid fields can still be checked in the same run.

    Returns the service (None when even that is not possible) and the names of the fields left out: rules
    that involve those are not checked, since they would only see defaults in their place.
    """
    dropped: set[str] = set()
    for _ in range(3):
        try:
            return ServiceSpec.model_validate(raw), frozenset(dropped)
        except ValidationError as exc:
            if not isinstance(raw, dict):
                return None, frozenset()
            raw = copy.deepcopy(raw)
            for error in exc.errors():
                loc = tuple(error["loc"])
                if error["type"] == "missing" or not loc:
                    return None, frozenset()
                field = raw.get(loc[0])
                if loc[0] == "servers" and len(loc) >= 2 and isinstance(field, dict):
                    dropped.add("servers")
                    field.pop(loc[1], None)  # an invalid server is left out as a whole
                elif len(loc) >= 2 and isinstance(field, dict):
                    dropped.add(f"{loc[0]}.{loc[1]}")
                    field.pop(loc[1], None)  # e.g. check.interval takes its default
                else:
                    dropped.add(str(loc[0]))
                    raw.pop(loc[0], None)
    return None, frozenset()


def _listen_conflicts(services: dict[str, ServiceSpec]) -> list[Issue]:
    """Two services may not listen on one port where their addresses overlap (a wildcard overlaps all)."""
    found: list[Issue] = []
    seen: dict[tuple[str, int], str] = {}
    for name, service in services.items():
        addr = service.listen
        wildcard = "::" if addr.family_v6 else "0.0.0.0"
        for (host, port), other in seen.items():
            if port != addr.port:
                continue
            if host == addr.host or (wildcard in (host, addr.host) and (":" in host) == addr.family_v6):
                found.append((("services", name, "listen"), f"{addr} is already used by service '{other}'"))
                break
        else:
            seen[(addr.host, addr.port)] = name
    return found


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file.

    Raises:
        ConfigError: the file cannot be read, or is not a valid config (every problem listed).
    """
    name = str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigIssue(name, None, "", f"cannot read: {exc.strerror or exc}")]) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue(name, None, "", f"larger than {MAX_CONFIG_BYTES} bytes; not a config")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(name, None, "", f"not UTF-8 text: {exc.reason}")]) from exc
    return load_config_text(text, name)
