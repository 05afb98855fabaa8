"""The admin API's request checks (pacslb/admin/guard.py): which Host names are served, and which writes a
browser page of another origin could make, token or not."""

from __future__ import annotations

import pytest

from pacslb.admin.guard import host_allowed, refusal


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:9900", "127.0.0.1", "127.1.2.3:9900", "localhost:9900", "LOCALHOST", "[::1]:9900", "[::1]",
        "[0:0:0:0:0:0:0:1]:9900", "[::ffff:127.0.0.1]:9900", "",
    ],
)  # fmt: skip
def test_loopback_names_are_served(host: str) -> None:
    assert host_allowed(host, "127.0.0.1")


@pytest.mark.parametrize(
    "host",
    [
        "rebind.evil.example", "rebind.evil.example:9900", "localhost.evil.example", "127.0.0.1.nip.io:9900",
        "10.0.0.9:9900", "[fd00::9]:9900", "evil@127.0.0.1", "127.0.0.1/x", "127.1", "0x7f000001", "[::1",
        "127.0.0.1:99999999", "local host",
    ],
)  # fmt: skip
def test_any_other_name_is_refused(host: str) -> None:
    assert not host_allowed(host, "127.0.0.1", "127.0.0.1")


def test_the_listener_s_own_address_is_served() -> None:
    assert host_allowed("10.0.0.5:9900", "10.0.0.5")
    assert host_allowed("[fd00::5]:9900", "fd00::5")
    assert host_allowed("[FD00:0::5]:9900", "fd00::5")  # the same address written otherwise
    # On 0.0.0.0 or ::, the address the request came in on (as the kernel gives it: IPv4-mapped on ::).
    assert host_allowed("10.0.0.5:9900", "0.0.0.0", "10.0.0.5")
    assert host_allowed("10.0.0.5:9900", "::", "::ffff:10.0.0.5")
    assert not host_allowed("10.0.0.6:9900", "0.0.0.0", "10.0.0.5")
    assert not host_allowed("0.0.0.0:9900", "0.0.0.0", "10.0.0.5")  # the wildcard names no listener


def test_the_names_in_admin_hosts_are_served_and_no_others() -> None:
    names = ("lb1.hospital.example",)
    for host in ("lb1.hospital.example", "LB1.Hospital.Example:9900", "lb1.hospital.example.:9900"):
        assert host_allowed(host, "10.0.0.5", "10.0.0.5", names), host
    for host in ("lb2.hospital.example", "lb1.hospital.example.evil.example", "evil.example"):
        assert not host_allowed(host, "10.0.0.5", "10.0.0.5", names), host
    assert refusal("GET", {"host": "lb1.hospital.example:9900"}, "10.0.0.5", None, names) is None


def test_admin_hosts_in_the_config_are_names_in_lower_case() -> None:
    from pacslb.config.model import AdminSpec

    assert AdminSpec.model_validate({"hosts": ["LB1.Hospital.Example."]}).hosts == ("lb1.hospital.example",)
    for bad in ("10.0.0.5:9900", "lb1 .example", "http://lb1", ""):
        with pytest.raises(ValueError, match="host name"):
            AdminSpec.model_validate({"hosts": [bad]})


def test_a_foreign_host_is_refused_for_every_method() -> None:
    for method in ("GET", "POST", "HEAD"):
        found = refusal(method, {"host": "rebind.evil.example:9900"}, "127.0.0.1")
        assert found is not None and found.status == 403 and "rebind.evil.example" in found.detail


def test_reads_need_nothing_more() -> None:
    assert refusal("GET", {"host": "127.0.0.1:9900"}, "127.0.0.1") is None
    assert refusal("GET", {"host": "127.0.0.1:9900", "origin": "null"}, "127.0.0.1") is None


OWN = {"host": "127.0.0.1:9900"}


@pytest.mark.parametrize(
    "headers",
    [
        {"x-pacslb-request": "1"},
        {"content-type": "application/json"},
        {"content-type": "Application/JSON; charset=utf-8"},
        {"x-pacslb-request": "1", "origin": "http://127.0.0.1:9900", "sec-fetch-site": "same-origin"},
    ],
)
def test_writes_from_programs_and_the_dashboard_pass(headers: dict[str, str]) -> None:
    for method in ("POST", "PUT", "DELETE"):
        assert refusal(method, {**OWN, **headers}, "127.0.0.1") is None


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 415),  # curl -X POST, a form without a body
        ({"content-type": "text/plain"}, 415),  # a simple cross-origin fetch or form
        ({"content-type": "application/x-www-form-urlencoded"}, 415),
        ({"content-type": "multipart/form-data; boundary=x"}, 415),
        ({"content-type": "application/jsonp"}, 415),
        ({"content-type": "text/plain", "origin": "null"}, 403),  # a sandboxed frame or a data: URL
        ({"content-type": "application/json", "origin": "null"}, 403),
        ({"x-pacslb-request": "1", "origin": "http://evil.example"}, 403),
        ({"x-pacslb-request": "1", "origin": "http://127.0.0.1:8080"}, 403),  # another port: another origin
        ({"x-pacslb-request": "1", "sec-fetch-site": "cross-site"}, 403),
    ],
)
def test_writes_a_page_elsewhere_could_make_are_refused(headers: dict[str, str], status: int) -> None:
    found = refusal("POST", {**OWN, **headers}, "127.0.0.1")
    assert found is not None and found.status == status, found
