"""Unit tests for config loading: typed defaults, and every problem reported at once as
``file:line: path.to.field: reason``.

Each test writes its YAML inline so that the line numbers asserted can be read off the text.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pydantic
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pacslb.config import (
    CheckSpec,
    Config,
    HostPort,
    PersistenceSpec,
    ServerSpec,
    load_config,
    load_config_text,
)
from pacslb.config.loader import MAX_CONFIG_BYTES
from pacslb.config.model import SUPPORTED_MODES
from pacslb.errors import ConfigError, ConfigIssue, PacslbError

FILE = "pacslb.yaml"

DESIGN_EXAMPLE = """\
services:
  dicom:
    listen: 0.0.0.0:104          # required, host:port
    mode: tcp                    # tcp | dicom | http  (default tcp)
    balance: leastconn           # leastconn | roundrobin
    persistence: {type: source_ip, timeout: 30m}   # none | source_ip | cookie | ...
    check: {type: tcp, interval: 2s, timeout: 2s, rise: 2, fall: 3}   # tcp | http | dicom_echo | none
    servers:
      pacs1: 10.0.0.11:104
      pacs2: {address: 10.0.0.12:104, weight: 2}
  web:
    listen: 0.0.0.0:80
    mode: http
    persistence: {type: cookie+source_ip, cookie: SERVERID, timeout: 30m}
    check: {type: http, method: HEAD, path: /, expect_status: [200]}
    servers: {pacs1: 10.0.0.11:80, pacs2: 10.0.0.12:80}
"""


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), FILE)


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), FILE)
    assert info.value.issues, "a ConfigError must carry at least one issue"
    return info.value.issues


def located(text: str) -> list[tuple[int | None, str]]:
    """The (line, field) of every issue, in the order reported."""
    return [(i.line, i.field) for i in issues_of(text)]


def one_issue(text: str) -> ConfigIssue:
    found = issues_of(text)
    assert len(found) == 1, [str(i) for i in found]
    return found[0]


def service(extra: str = "", *, listen: str = "127.0.0.1:104", servers: str = "{p1: 10.0.0.11:104}") -> str:
    """A one-service config. ``extra`` lines (indented by 4 spaces) follow ``servers``: from line 5 when
    ``servers`` fits on line 4."""
    body = "".join(f"    {line}\n" for line in textwrap.dedent(extra).splitlines() if line.strip())
    return f"services:\n  a:\n    listen: {listen}\n    servers: {servers}\n{body}"


# --- valid configs and defaults ------------------------------------------------------------------------


def test_minimal_config_and_every_default() -> None:
    config = load("""\
        services:
          a:
            listen: 127.0.0.1:104
            servers: {pacs1: 10.0.0.11:104}
        """)
    assert list(config.services) == ["a"]
    svc = config.services["a"]
    assert svc.listen == HostPort("127.0.0.1", 104)
    assert svc.mode == "tcp"
    assert svc.balance == "leastconn"
    assert svc.maxconn == 4096
    assert svc.retries == 3
    assert svc.servers == {"pacs1": ServerSpec(address=HostPort("10.0.0.11", 104), weight=1)}

    p = svc.persistence
    assert (p.type, p.timeout, p.netmask, p.netmask6, p.max_entries, p.cookie) == (
        "none",
        1800.0,
        32,
        128,
        100_000,
        "SERVERID",
    )
    c = svc.check
    assert (c.type, c.interval, c.timeout, c.rise, c.fall, c.port) == ("tcp", 2.0, 2.0, 2, 3, None)
    assert (c.method, c.path, c.host, c.expect_status, c.expect_body) == ("HEAD", "/", None, (200,), None)
    assert (c.calling_ae, c.called_ae) == ("PACSLB", "ANY-SCP")
    t = svc.timeouts
    assert (t.connect, t.client_idle, t.server_idle) == (5.0, 43200.0, 43200.0)

    assert (config.log.format, config.log.level) == ("text", "info")
    assert config.shutdown_grace == 30.0


def test_design_example_dicom_service_loads_with_its_values() -> None:
    dicom_only = DESIGN_EXAMPLE.split("  web:")[0]
    config = load_config_text(dicom_only, FILE)
    svc = config.services["dicom"]
    assert svc.listen == HostPort("0.0.0.0", 104)
    assert svc.mode == "tcp"
    assert svc.balance == "leastconn"
    assert (svc.persistence.type, svc.persistence.timeout) == ("source_ip", 1800.0)
    assert svc.persistence == PersistenceSpec.model_validate({"type": "source_ip", "timeout": "30m"})
    c = svc.check
    assert (c.type, c.interval, c.timeout, c.rise, c.fall) == ("tcp", 2.0, 2.0, 2, 3)
    assert c == CheckSpec.model_validate({"type": "tcp", "interval": "2s", "timeout": "2s", "rise": 2, "fall": 3})
    assert svc.servers["pacs1"] == ServerSpec(address=HostPort("10.0.0.11", 104), weight=1)
    assert svc.servers["pacs2"] == ServerSpec(address=HostPort("10.0.0.12", 104), weight=2)
    assert list(svc.servers) == ["pacs1", "pacs2"]  # file order is kept


def test_design_example_refuses_only_the_http_mode_until_http_is_available() -> None:
    if "http" in SUPPORTED_MODES:
        config = load_config_text(DESIGN_EXAMPLE, FILE)
        assert config.services["web"].persistence.type == "cookie+source_ip"
        return
    issue = one_issue(DESIGN_EXAMPLE)
    assert (issue.file, issue.line, issue.field) == (FILE, 13, "services.web.mode")
    assert "'http'" in issue.reason
    assert "not available" in issue.reason


PERSISTENCE_FOR_MODE = {"tcp": "source_ip", "dicom": "calling_ae", "http": "cookie"}


@pytest.mark.parametrize("mode", ["tcp", "dicom", "http"])
def test_modes_this_version_cannot_run_are_refused_naming_the_mode(mode: str) -> None:
    """The modes of the contract are tcp, dicom and http; those not yet available are refused by name."""
    text = service(f"mode: {mode}\npersistence: {{type: {PERSISTENCE_FOR_MODE[mode]}}}")
    assert "tcp" in SUPPORTED_MODES
    if mode in SUPPORTED_MODES:
        svc = load(text).services["a"]
        assert (svc.mode, svc.persistence.type) == (mode, PERSISTENCE_FOR_MODE[mode])
        return
    issue = one_issue(text)
    assert (issue.line, issue.field) == (5, "services.a.mode")
    assert f"mode '{mode}' is not available" in issue.reason
    assert all(m in issue.reason for m in SUPPORTED_MODES)  # the reason lists what is available


def test_roundrobin_and_source_ip_options() -> None:
    config = load(
        service("""
            balance: roundrobin
            persistence:
              {type: source_ip, timeout: 1h30m, netmask: 255.255.255.0, netmask6: /64, max_entries: 10}
            timeouts: {connect: 500ms, client_idle: 1h, server_idle: 2h}
            maxconn: 10
            retries: 0
            """)
    )
    svc = config.services["a"]
    assert svc.balance == "roundrobin"
    p = svc.persistence
    assert (p.type, p.timeout, p.netmask, p.netmask6, p.max_entries) == ("source_ip", 5400.0, 24, 64, 10)
    assert (svc.timeouts.connect, svc.timeouts.client_idle, svc.timeouts.server_idle) == (0.5, 3600.0, 7200.0)
    assert (svc.maxconn, svc.retries) == (10, 0)


def test_http_check_fields_on_an_http_check() -> None:
    config = load(
        service("""
            check:
              type: http
              method: GET
              path: /health
              host: pacs.example
              expect_status: [200, 204]
              expect_body: OK
            """)
    )
    c = config.services["a"].check
    assert (c.type, c.method, c.path, c.host, c.expect_status, c.expect_body) == (
        "http",
        "GET",
        "/health",
        "pacs.example",
        (200, 204),
        "OK",
    )


def test_dicom_echo_check_fields() -> None:
    config = load(service("check: {type: dicom_echo, calling_ae: '  ME', called_ae: ORTHANC, port: 4242}"))
    c = config.services["a"].check
    assert (c.type, c.calling_ae, c.called_ae, c.port) == ("dicom_echo", "ME", "ORTHANC", 4242)


def test_server_shorthand_equals_long_form() -> None:
    config = load(service(servers="{pacs1: 10.0.0.11:104, pacs2: {address: 10.0.0.12:104}, pacs3: '[fd00::13]:104'}"))
    servers = config.services["a"].servers
    assert servers["pacs1"] == ServerSpec(address=HostPort("10.0.0.11", 104))
    assert servers["pacs1"] == servers["pacs2"].model_copy(update={"address": HostPort("10.0.0.11", 104)})
    assert servers["pacs3"].address == HostPort("fd00::13", 104)
    assert servers["pacs3"].weight == 1


@pytest.mark.parametrize("weight", [0, 1, 128, 256])
def test_weights_in_range_are_accepted(weight: int) -> None:
    config = load(service(servers=f"{{p1: 10.0.0.11:104, p2: {{address: 10.0.0.12:104, weight: {weight}}}}}"))
    assert config.services["a"].servers["p2"].weight == weight


def test_shutdown_grace_may_be_zero_and_log_options() -> None:
    config = load(service() + "shutdown_grace: 0s\nlog: {format: json, level: debug}\n")
    assert config.shutdown_grace == 0.0
    assert (config.log.format, config.log.level) == ("json", "debug")


def test_node_answer_defaults_to_3s_and_follows_a_shorter_negotiation_unless_set() -> None:
    timeouts = load(service()).services["a"].timeouts
    assert (timeouts.negotiation, timeouts.node_answer) == (10.0, 3.0)
    timeouts = load(service("timeouts: {negotiation: 500ms}")).services["a"].timeouts
    assert (timeouts.negotiation, timeouts.node_answer) == (0.5, 0.5)
    timeouts = load(service("timeouts: {negotiation: 1s, node_answer: 5s}")).services["a"].timeouts
    assert (timeouts.negotiation, timeouts.node_answer) == (1.0, 5.0)  # the user's own choice stands


def test_check_timeout_equal_to_interval_is_accepted() -> None:
    config = load(service("check: {interval: 1s, timeout: 1s}"))
    assert config.services["a"].check.timeout == config.services["a"].check.interval == 1.0


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:104", "127.0.0.2:104"),  # different addresses, same port
        ("0.0.0.0:104", "0.0.0.0:105"),  # same address, different ports
        ("127.0.0.1:104", "'[::1]:104'"),  # different families
    ],
)
def test_services_on_distinct_addresses_are_accepted(first: str, second: str) -> None:
    config = load(f"""\
        services:
          a:
            listen: {first}
            servers: {{p1: 10.0.0.11:104}}
          b:
            listen: {second}
            servers: {{p1: 10.0.0.11:104}}
        """)
    assert list(config.services) == ["a", "b"]


def test_dumped_config_loads_back_equal() -> None:
    config = load(
        service(
            """
            balance: roundrobin
            persistence: {type: source_ip, timeout: 1h30m, netmask: 16}
            check: {interval: 1500ms, timeout: 1s}
            """,
            listen="'[::1]:104'",
            servers="{p1: 10.0.0.11:104, p2: {address: 10.0.0.12:104, weight: 3}}",
        )
        + "shutdown_grace: 0s\n"
    )
    dumped = yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True))
    assert load_config_text(dumped, FILE) == config


# --- immutability --------------------------------------------------------------------------------------


@pytest.fixture
def config() -> Config:
    return load(service("persistence: {type: source_ip}"))


def test_config_fields_cannot_be_assigned(config: Config) -> None:
    with pytest.raises(pydantic.ValidationError):
        config.shutdown_grace = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.log.level = "debug"  # type: ignore[misc]
    svc = config.services["a"]
    with pytest.raises(pydantic.ValidationError):
        svc.maxconn = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        svc.persistence.timeout = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        svc.check.interval = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        svc.servers["p1"].weight = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        svc.listen.port = 1  # type: ignore[misc]
    assert svc.check.expect_status == (200,)
    assert isinstance(svc.check.expect_status, tuple)


def test_config_mappings_cannot_be_changed(config: Config) -> None:
    """The config is one immutable object (CONVENTIONS 6): its mappings must not be changeable either."""
    with pytest.raises(TypeError):
        config.services["b"] = config.services["a"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.services["a"].servers.pop("p1")  # type: ignore[attr-defined]
    assert list(config.services) == ["a"]
    assert list(config.services["a"].servers) == ["p1"]


# --- located errors: one at a time ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "line", "field", "reason"),
    [
        # unknown keys, at every level
        ("bogus: 1", 5, "services.a.bogus", "unknown key"),
        ("persistence: {type: source_ip, tmeout: 30m}", 5, "services.a.persistence.tmeout", "unknown key"),
        ("check:\n  type: tcp\n  intervall: 2s", 7, "services.a.check.intervall", "unknown key"),
        ("timeouts: {idle: 1s}", 5, "services.a.timeouts.idle", "unknown key"),
        # durations: bare numbers and bad spellings
        ("check: {interval: 2}", 5, "services.a.check.interval", "needs a unit"),
        ("check:\n  interval: 5s\n  timeout: 2", 7, "services.a.check.timeout", "needs a unit"),
        (
            "persistence: {type: source_ip, timeout: 1800}",
            5,
            "services.a.persistence.timeout",
            "needs a unit",
        ),
        ("timeouts:\n  connect: 2 s", 6, "services.a.timeouts.connect", "not a duration"),
        ("timeouts: {client_idle: 0s}", 5, "services.a.timeouts.client_idle", "greater than 0"),
        ("persistence: {timeout: 0ms}", 5, "services.a.persistence.timeout", "greater than 0"),
        # enumerations and ranges
        ("mode: udp", 5, "services.a.mode", "'tcp', 'dicom' or 'http'"),
        ("balance: random", 5, "services.a.balance", "'leastconn', 'roundrobin' or 'consistent'"),
        ("persistence: {type: sticky}", 5, "services.a.persistence.type", "Input should be"),
        ("persistence: {netmask: 33}", 5, "services.a.persistence.netmask", "0..32"),
        ("persistence: {netmask: 255.0.255.0}", 5, "services.a.persistence.netmask", "not a netmask"),
        ("persistence: {netmask6: 129}", 5, "services.a.persistence.netmask6", "0..128"),
        (
            "persistence: {max_entries: 0}",
            5,
            "services.a.persistence.max_entries",
            "greater than or equal to 1",
        ),
        ("check: {rise: 0}", 5, "services.a.check.rise", "greater than or equal to 1"),
        ("check: {fall: 101}", 5, "services.a.check.fall", "less than or equal to 100"),
        ("check: {port: 70000}", 5, "services.a.check.port", "less than or equal to 65535"),
        ("check: {type: http, path: health}", 5, "services.a.check.path", "must start with '/'"),
        ("check: {type: http, method: POST}", 5, "services.a.check.method", "'HEAD' or 'GET'"),
        ("check: {type: http, expect_status: []}", 5, "services.a.check.expect_status", "at least 1"),
        (
            "check: {type: dicom_echo, calling_ae: ABCDEFGHIJKLMNOPQ}",
            5,
            "services.a.check.calling_ae",
            "AE title",
        ),
        ("check: {type: dicom_echo, called_ae: 'A\\B'}", 5, "services.a.check.called_ae", "AE title"),
        ("maxconn: 0", 5, "services.a.maxconn", "greater than or equal to 1"),
        ("retries: 17", 5, "services.a.retries", "less than or equal to 16"),
        # persistence types this mode cannot carry out
        (
            "persistence: {type: cookie}",
            5,
            "services.a.persistence.type",
            "'cookie' cannot be done in mode 'tcp'",
        ),
        ("persistence: {type: cookie+source_ip}", 5, "services.a.persistence.type", "mode 'tcp'"),
        ("persistence: {type: calling_ae}", 5, "services.a.persistence.type", "'calling_ae' cannot be done"),
        ("persistence: {type: calling_ae+source_ip}", 5, "services.a.persistence.type", "mode 'tcp'"),
        # check fields that only apply to another check type
        (
            "check: {type: tcp, path: /health}",
            5,
            "services.a.check.path",
            "only applies to checks of type http",
        ),
        ("check:\n  method: GET", 6, "services.a.check.method", "only applies to checks of type http"),
        ("check:\n  type: none\n  host: x", 7, "services.a.check.host", "(this one is none)"),
        ("check: {expect_status: [200]}", 5, "services.a.check.expect_status", "type http"),
        ("check: {type: dicom_echo, expect_body: OK}", 5, "services.a.check.expect_body", "type http"),
        ("check: {type: tcp, calling_ae: ME}", 5, "services.a.check.calling_ae", "type dicom_echo"),
        ("check: {type: http, called_ae: ME}", 5, "services.a.check.called_ae", "type dicom_echo"),
        ("check: {type: http, expect_body: OK}", 5, "services.a.check.expect_body", "needs method GET"),
        # check timeout longer than interval, given or by default
        (
            "check: {interval: 1s, timeout: 1500ms}",
            5,
            "services.a.check.timeout",
            "not be longer than check.interval",
        ),
        ("check:\n  interval: 1s\n  timeout: 2s", 7, "services.a.check.timeout", "not be longer than check.interval"),
    ],
)
def test_single_error_is_located(extra: str, line: int, field: str, reason: str) -> None:
    issue = one_issue(service(extra))
    assert (issue.file, issue.line, issue.field) == (FILE, line, field)
    assert reason in issue.reason
    assert str(issue) == f"{FILE}:{line}: {field}: {issue.reason}"


@pytest.mark.parametrize(
    ("listen", "field", "reason"),
    [
        ("pacs.example:104", "services.a.listen", "not an IP address"),
        ("127.0.0.1", "services.a.listen", "expected 'address:port'"),
        ("127.0.0.1:0", "services.a.listen", "port must be"),
        ("127.0.0.1:65536", "services.a.listen", "port must be"),
        ("104", "services.a.listen", "expected 'address:port'"),
        ("'[::1]'", "services.a.listen", "expected 'address:port'"),
    ],
)
def test_bad_listen_address(listen: str, field: str, reason: str) -> None:
    issue = one_issue(service(listen=listen))
    assert (issue.line, issue.field) == (3, field)
    assert reason in issue.reason


@pytest.mark.parametrize(
    ("servers", "field", "reason"),
    [
        ("{p1: pacs1.example:104}", "services.a.servers.p1.address", "not an IP address"),
        ("{p1: {address: pacs1:104}}", "services.a.servers.p1.address", "host names are not resolved"),
        ("{p1: 10.0.0.11}", "services.a.servers.p1.address", "expected 'address:port'"),
        ("{p1: 10.0.0.11:0}", "services.a.servers.p1.address", "port must be"),
        ("{p1: 10.0.0.300:104}", "services.a.servers.p1.address", "not an IP address"),
        ("{p1: 104}", "services.a.servers.p1", "valid dictionary"),
        ("{p1: {weight: 2}}", "services.a.servers.p1.address", "required"),
        (
            "{p1: {address: 10.0.0.11:104, weight: 257}}",
            "services.a.servers.p1.weight",
            "less than or equal to 256",
        ),
        (
            "{p1: {address: 10.0.0.11:104, weight: -1}}",
            "services.a.servers.p1.weight",
            "greater than or equal to 0",
        ),
        ("{p1: {address: 10.0.0.11:104, wieght: 2}}", "services.a.servers.p1.wieght", "unknown key"),
        ("{p1: {address: 10.0.0.11:104, weight: 0}}", "services.a.servers", "every server has weight 0"),
        ("{}", "services.a.servers", "at least 1 item"),
    ],
)
def test_bad_server(servers: str, field: str, reason: str) -> None:
    issue = one_issue(service(servers=servers))
    assert (issue.line, issue.field) == (4, field)
    assert reason in issue.reason


def test_missing_listen_and_servers_are_both_reported() -> None:
    assert [(i.line, i.field, i.reason) for i in issues_of("services:\n  a:\n    mode: tcp\n")] == [
        (2, "services.a.listen", "required"),
        (2, "services.a.servers", "required"),
    ]


def test_missing_services() -> None:
    issue = one_issue("log: {level: info}\n")
    assert (issue.line, issue.field, issue.reason) == (1, "services", "required")


def test_empty_services() -> None:
    issue = one_issue("services: {}\n")
    assert (issue.line, issue.field) == (1, "services")
    assert "at least 1 item" in issue.reason


def test_service_that_is_not_a_mapping() -> None:
    issue = one_issue("services:\n  a: 10.0.0.1:104\n")
    assert (issue.line, issue.field) == (2, "services.a")


def test_unknown_top_level_key() -> None:
    issue = one_issue(service() + "\nlisten: 0.0.0.0:104\n")
    assert (issue.line, issue.field, issue.reason) == (6, "listen", "unknown key")


def test_bare_number_shutdown_grace() -> None:
    issue = one_issue(service() + "shutdown_grace: 30\n")
    assert (issue.line, issue.field) == (5, "shutdown_grace")
    assert "needs a unit" in issue.reason


# --- listen conflicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:104", "127.0.0.1:104"),
        ("0.0.0.0:104", "127.0.0.1:104"),  # the wildcard overlaps every address
        ("127.0.0.1:104", "0.0.0.0:104"),
        ("0.0.0.0:104", "0.0.0.0:104"),
        ("'[::]:104'", "'[::1]:104'"),
        ("'[::1]:104'", "'[::]:104'"),
        ("'[::0]:104'", "'[0::]:104'"),  # the same address spelled two ways
    ],
)
def test_two_services_on_one_listen_address(first: str, second: str) -> None:
    issue = one_issue(f"""\
        services:
          a:
            listen: {first}
            servers: {{p1: 10.0.0.11:104}}
          b:
            listen: {second}
            servers: {{p1: 10.0.0.11:104}}
        """)
    assert (issue.line, issue.field) == (6, "services.b.listen")
    assert "already used by service 'a'" in issue.reason


def test_listen_conflict_with_a_wildcard_among_three_services() -> None:
    found = issues_of("""\
        services:
          a:
            listen: 127.0.0.1:104
            servers: {p1: 10.0.0.11:104}
          b:
            listen: 127.0.0.2:104
            servers: {p1: 10.0.0.11:104}
          c:
            listen: 0.0.0.0:104
            servers: {p1: 10.0.0.11:104}
        """)
    assert [(i.line, i.field) for i in found] == [(9, "services.c.listen")]


# --- every error at once -------------------------------------------------------------------------------


def test_every_error_is_reported_at_once_in_file_order() -> None:
    text = """\
        services:
          a:
            listen: 0.0.0.0:104
            bogus: 1
            servers:
              p1: pacs1.example:104
              p2: {address: 10.0.0.12:104, weight: 257}
              p3: 10.0.0.13:104
          b:
            listen: 127.0.0.1:104
            servers: {p1: 10.0.0.11:104}
            check: {type: tcp, interval: 2, path: /health}
          c:
            listen: 127.0.0.1:105
            persistence: {type: cookie, timeout: 30}
            servers: {p1: 10.0.0.11:105}
          d:
            listen: 127.0.0.1:106
            check: {interval: 1s, timeout: 3s}
            servers: {p1: 10.0.0.11:106}
            servers: {p1: 10.0.0.11:106}
        log: {level: loud}
        extra: 1
        """
    found = issues_of(text)
    assert [(i.line, i.field) for i in found] == [
        (4, "services.a.bogus"),
        (6, "services.a.servers.p1.address"),
        (7, "services.a.servers.p2.weight"),
        (10, "services.b.listen"),
        (12, "services.b.check.interval"),
        (12, "services.b.check.path"),
        (15, "services.c.persistence.timeout"),
        (15, "services.c.persistence.type"),
        (19, "services.d.check.timeout"),
        (21, "services.d.servers"),
        (22, "log.level"),
        (23, "extra"),
    ]
    reasons = {i.field: i.reason for i in found}
    assert reasons["services.a.bogus"] == "unknown key"
    assert "not an IP address" in reasons["services.a.servers.p1.address"]
    assert "256" in reasons["services.a.servers.p2.weight"]
    assert "already used by service 'a'" in reasons["services.b.listen"]
    assert "needs a unit" in reasons["services.b.check.interval"]
    assert "type http" in reasons["services.b.check.path"]
    assert "needs a unit" in reasons["services.c.persistence.timeout"]
    assert "'cookie' cannot be done in mode 'tcp'" in reasons["services.c.persistence.type"]
    assert "longer than check.interval" in reasons["services.d.check.timeout"]
    assert reasons["services.d.servers"] == "duplicate key (first given on line 20)"
    assert reasons["extra"] == "unknown key"
    assert all(i.file == FILE for i in found)


def test_config_error_message_lists_every_issue() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(service("check: {interval: 1s, timeout: 2s}\nbogus: 1"), FILE)
    assert isinstance(info.value, PacslbError)
    assert str(info.value).splitlines() == [str(i) for i in info.value.issues]
    assert str(info.value).splitlines() == [
        f"{FILE}:5: services.a.check.timeout: must not be longer than check.interval",
        f"{FILE}:6: services.a.bogus: unknown key",
    ]


def test_invalid_mode_does_not_cause_errors_about_a_default_mode() -> None:
    """An invalid mode is one mistake; the persistence type must not be judged against a mode the user
    never wrote (here 'htp' for 'http', where cookie persistence is fine)."""
    issue = one_issue(service("mode: htp\npersistence: {type: cookie}"))
    assert (issue.line, issue.field) == (5, "services.a.mode")


def test_invalid_check_type_does_not_cause_errors_about_a_default_type() -> None:
    """check.type 'htp' is one mistake; 'path' must not be reported as not applying to a 'tcp' check."""
    issue = one_issue(service("check: {type: htp, path: /health}"))
    assert (issue.line, issue.field) == (5, "services.a.check.type")


def test_invalid_list_item_does_not_cause_errors_about_a_default_check() -> None:
    """One bad status code is one mistake: the rest of the check (type http) must still be taken as given."""
    issue = one_issue(service("check:\n  type: http\n  expect_status:\n    - 200\n    - 99"))
    assert (issue.line, issue.field) == (9, "services.a.check.expect_status.1")
    assert "greater than or equal to 100" in issue.reason


def test_invalid_server_does_not_cause_an_all_zero_weights_error() -> None:
    """p1's weight is out of range (one mistake); p2 having weight 0 is fine next to it."""
    issue = one_issue(
        service(servers="{p1: {address: 10.0.0.11:104, weight: 300}, p2: {address: 10.0.0.12:104, weight: 0}}")
    )
    assert (issue.line, issue.field) == (4, "services.a.servers.p1.weight")


# --- YAML-level problems -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "field", "reason"),
    [
        ("services:\n  a: 1\n  a: 2\n", 3, "services.a", "duplicate key (first given on line 2)"),
        ("services: {}\nservices: {}\n", 2, "services", "duplicate key (first given on line 1)"),
    ],
)
def test_duplicate_keys(text: str, line: int, field: str, reason: str) -> None:
    found = issues_of(text)
    assert [(i.line, i.field, i.reason) for i in found if i.reason.startswith("duplicate")] == [(line, field, reason)]


def test_duplicate_server_name_is_reported_and_the_rest_still_checked() -> None:
    found = issues_of(
        service(
            "check: {interval: 2}",
            servers="\n      pacs1: 10.0.0.11:104\n      pacs2: 10.0.0.12:104\n      pacs1: 10.0.0.13:104",
        )
    )
    assert [(i.line, i.field, i.reason) for i in found] == [
        (7, "services.a.servers.pacs1", "duplicate key (first given on line 5)"),
        (8, "services.a.check.interval", found[1].reason),
    ]
    assert "needs a unit" in found[1].reason


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("services:\n  a: [1, 2\n", 3),
        ("services:\n  a:\n    listen: 1.2.3.4:5\n   servers: {}\n", 4),
        ("services:\n\ta: 1\n", 2),
        ("services: {a: 1\n", 2),
        ("services: 'unterminated\n", 2),
    ],
)
def test_invalid_yaml(text: str, line: int) -> None:
    issue = one_issue(text)
    assert (issue.file, issue.line, issue.field) == (FILE, line, "")
    assert issue.reason.startswith("not valid YAML: ")
    assert str(issue).startswith(f"{FILE}:{line}: not valid YAML: ")


def test_several_yaml_documents_are_refused() -> None:
    issue = one_issue(service() + "---\nservices: {}\n")
    assert issue.field == ""
    assert issue.reason.startswith("not valid YAML")


@pytest.mark.parametrize("text", ["", "\n\n", "   \n", "# only a comment\n"])
def test_empty_file(text: str) -> None:
    issue = one_issue(text)
    assert (issue.line, issue.field) == (1, "")
    assert "empty" in issue.reason


@pytest.mark.parametrize("text", ["- services\n", "services\n", "42\n", "~\n", "null\n", "[a, b]\n", "---\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    issue = one_issue(text)
    assert (issue.line, issue.field) == (1, "")
    assert "top level must be a mapping" in issue.reason


@pytest.mark.parametrize("key", ["~", "true", "[a, b]"])
def test_keys_that_are_not_names(key: str) -> None:
    found = issues_of(service() + f"? {key}\n: 1\n")
    assert [i.line for i in found] == [5]
    assert "is not a name" in found[0].reason


@pytest.mark.parametrize(
    "tail",
    [
        "<<: {log: {level: info}}\n",  # a YAML merge key
        "log: !custom {level: info}\n",  # a tag no loader knows
        "shutdown_grace: !!int thirty\n",  # a standard tag on a value it cannot construct
        "log: {level: !!float info}\n",
    ],
)
def test_yaml_constructs_are_config_errors_not_crashes(tail: str) -> None:
    """Every problem in the file is a ConfigError located at its line, never a raw YAML or Python error."""
    with pytest.raises(ConfigError) as info:
        load_config_text(service() + tail, FILE)
    assert [i.line for i in info.value.issues] == [5]


# --- load_config: reading the file ---------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pacslb.yaml"
    path.write_text(service(), encoding="utf-8")
    config = load_config(path)
    assert config.services["a"].listen == HostPort("127.0.0.1", 104)
    assert load_config(str(path)) == config


def test_load_config_issues_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(service("bogus: 1"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(i) for i in info.value.issues] == [f"{path}:5: services.a.bogus: unknown key"]


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [issue] = info.value.issues
    assert (issue.file, issue.line, issue.field) == (str(path), None, "")
    assert issue.reason == "cannot read: No such file or directory"
    assert str(issue) == f"{path}: cannot read: No such file or directory"
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    [issue] = info.value.issues
    assert issue.reason.startswith("cannot read: ")
    assert issue.line is None


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(service().encode() + "# Ärzte\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [issue] = info.value.issues
    assert (issue.file, issue.line, issue.field) == (str(path), None, "")
    assert issue.reason.startswith("not UTF-8 text: ")
    assert isinstance(info.value.__cause__, UnicodeDecodeError)


def test_load_config_utf8_comments_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "utf8.yaml"
    path.write_text("# Ärzte-Zentrum\n" + service(), encoding="utf-8")
    assert list(load_config(path).services) == ["a"]


def test_load_config_refuses_huge_files(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(service().encode() + b"#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [issue] = info.value.issues
    assert issue.line is None
    assert str(MAX_CONFIG_BYTES) in issue.reason


# --- properties ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=300), min_size=1, max_size=6))
def test_weights_are_checked_against_0_to_256(weights: list[int]) -> None:
    servers = "".join(f"\n      p{i}: {{address: 10.0.0.{i + 1}:104, weight: {w}}}" for i, w in enumerate(weights))
    text = service(servers=servers)
    bad = {f"services.a.servers.p{i}.weight": 5 + i for i, w in enumerate(weights) if not 0 <= w <= 256}
    if bad:
        found = issues_of(text)
        assert {i.field: i.line for i in found if i.field.endswith(".weight")} == bad
    elif all(w == 0 for w in weights):
        assert located(text) == [(4, "services.a.servers")]
    else:
        config = load(text)
        assert [s.weight for s in config.services["a"].servers.values()] == weights


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["bogus", "listn", "mod", "timeout", "server", "x1"]), unique=True, min_size=1))
def test_every_unknown_key_is_reported_with_its_line(keys: list[str]) -> None:
    text = service("\n".join(f"{k}: 1" for k in keys))
    assert located(text) == sorted((5 + n, f"services.a.{k}") for n, k in enumerate(keys))


def test_an_unset_check_timeout_follows_a_shorter_interval() -> None:
    """Only interval given: the timeout the user never set is not longer than it (and not an error)."""
    check = load(service("check: {interval: 500ms}")).services["a"].check
    assert (check.interval, check.timeout) == (0.5, 0.5)
    check = load(service("check: {interval: 5s}")).services["a"].check
    assert (check.interval, check.timeout) == (5.0, 2.0)
    issue = one_issue(service("check: {interval: 500ms, timeout: 1s}"))
    assert issue.field == "services.a.check.timeout" and "longer than check.interval" in issue.reason


def test_source_address_and_outbound_destinations() -> None:
    config = load(service("source: 10.0.0.100"))
    assert config.services["a"].source == "10.0.0.100"
    issue = one_issue(service("source: '::1'"))
    assert (issue.field, issue.line) == ("services.a.source", 5) and "IPv6, and server p1" in issue.reason
    issue = one_issue(service("source: 10.0.0"))
    assert issue.field == "services.a.source" and "expected an IP address" in issue.reason
    outbound = "mode: dicom\ndicom: {destination: called_ae}"
    assert load(service(outbound, servers="{WS01: 10.1.0.9:104}")).services["a"].dicom is not None
    issue = one_issue(service(outbound, servers="{A-NAME-LONGER-THAN-16: 10.1.0.9:104}"))
    assert issue.field == "services.a.servers.A-NAME-LONGER-THAN-16" and "AE title" in issue.reason
    issue = one_issue(service(outbound + "\npersistence: {type: calling_ae}", servers="{WS01: 10.1.0.9:104}"))
    assert issue.field == "services.a.persistence.type" and "persistence must be none" in issue.reason


def test_proxy_protocol_is_for_tcp_and_dicom_and_its_checks_need_a_plain_port() -> None:
    assert load(service("proxy_protocol: v2")).services["a"].proxy_protocol == "v2"
    issue = one_issue(service("mode: http\nproxy_protocol: v2"))
    assert issue.field == "services.a.proxy_protocol" and "X-Forwarded-For" in issue.reason
    issue = one_issue(service("mode: dicom\nproxy_protocol: v2\ncheck: {type: dicom_echo}"))
    assert issue.field == "services.a.check.port" and "PROXY header" in issue.reason
    checked = load(service("mode: dicom\nproxy_protocol: v2\ncheck: {type: dicom_echo, port: 11112}"))
    assert checked.services["a"].check.port == 11112
