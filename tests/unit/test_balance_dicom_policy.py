"""Unit and property tests for mode dicom's decisions (pacslb/balance/dicom_policy.py).

The contract is the ``dicom:`` section of docs/configuration.md: access control by calling AE (globs,
optionally bound to source networks) and called AE, answered with A-ASSOCIATE-RJ 1-1-3 / 1-1-7; routes,
first match wins, no match = all servers; persistence keys by calling AE, alone or with the source address.
Specs are built through the config model, as the loader builds them.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacslb.balance.dicom_policy import (
    AT_LIMIT,
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    NO_NODE,
    check_access,
    most_informative,
    persistence_key,
    route,
)
from pacslb.balance.persistence import source_ip_key
from pacslb.config.model import PERSISTENCE_BY_MODE, DicomSpec
from pacslb.protocols.dicom import Rejection, build_associate_rj

PROPERTY = settings(max_examples=80, deadline=None)


def spec(**fields: Any) -> DicomSpec:
    return DicomSpec.model_validate(fields)


# The example of docs/configuration.md, services.NAME.dicom
DOCS_SPEC = spec(
    allowed_calling_ae=["CT*", "MR01", {"ae": "US*", "sources": ["10.1.0.0/16"]}],
    called_ae=["INFINITT", "ANY-SCP"],
    routes=[
        {"calling_ae": "MR*", "servers": ["pacs2"]},
        {"source": "10.2.0.0/16", "called_ae": "ARCHIVE", "servers": ["pacs3"]},
    ],
)

# --- the rejections themselves ------------------------------------------------------------------------


def test_rejections_are_the_documented_ones() -> None:
    assert Rejection(1, 1, 3) == CALLING_AE_NOT_RECOGNIZED
    assert Rejection(1, 1, 7) == CALLED_AE_NOT_RECOGNIZED
    assert Rejection(2, 3, 1) == NO_NODE and NO_NODE.transient
    assert Rejection(2, 3, 2) == AT_LIMIT and AT_LIMIT.transient
    assert not CALLING_AE_NOT_RECOGNIZED.transient and not CALLED_AE_NOT_RECOGNIZED.transient
    # what dcmtk prints "Rejected Transient, Service Provider (Presentation Related), Temporary Congestion" for
    assert build_associate_rj(NO_NODE.result, NO_NODE.source, NO_NODE.reason) == bytes.fromhex("03000000000400020301")


# --- access control --------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["10.0.0.1", "fd00::1", "::ffff:10.0.0.1"])
def test_no_spec_allows_everything(client: str) -> None:
    assert check_access(None, "ANY", "ANY", client) is None
    assert check_access(spec(), "ANY", "ANY", client) is None
    assert check_access(spec(routes=[{"calling_ae": "MR*", "servers": ["pacs2"]}]), "X", "Y", client) is None


@pytest.mark.parametrize(
    ("calling", "called", "client", "expected"),
    [
        ("CT01", "INFINITT", "10.9.9.9", None),
        ("CT", "ANY-SCP", "fd00::9", None),  # "CT*" matches the empty rest too
        ("CTXYZ0123456789A", "INFINITT", "10.9.9.9", None),
        ("MR01", "INFINITT", "10.9.9.9", None),
        ("MR02", "INFINITT", "10.9.9.9", CALLING_AE_NOT_RECOGNIZED),
        ("MR011", "INFINITT", "10.9.9.9", CALLING_AE_NOT_RECOGNIZED),
        ("XCT01", "INFINITT", "10.9.9.9", CALLING_AE_NOT_RECOGNIZED),
        # AE titles are case-sensitive (PS3.5 6.2), patterns too
        ("ct01", "INFINITT", "10.9.9.9", CALLING_AE_NOT_RECOGNIZED),
        ("Mr01", "INFINITT", "10.9.9.9", CALLING_AE_NOT_RECOGNIZED),
        ("CT01", "infinitt", "10.9.9.9", CALLED_AE_NOT_RECOGNIZED),
        ("CT01", "INFINITT2", "10.9.9.9", CALLED_AE_NOT_RECOGNIZED),
        ("CT01", "ARCHIVE", "10.9.9.9", CALLED_AE_NOT_RECOGNIZED),
        # US* only from 10.1.0.0/16
        ("US01", "INFINITT", "10.1.2.3", None),
        ("US01", "INFINITT", "10.1.255.255", None),
        ("US01", "INFINITT", "10.2.0.1", CALLING_AE_NOT_RECOGNIZED),
        ("US01", "INFINITT", "::ffff:10.1.2.3", None),  # a dual-stack listener's view of 10.1.2.3
        ("US01", "INFINITT", "::ffff:10.2.0.1", CALLING_AE_NOT_RECOGNIZED),
        ("US01", "INFINITT", "fd00::10:1:2:3", CALLING_AE_NOT_RECOGNIZED),  # IPv6 is never in an IPv4 network
        ("US01", "INFINITT", "::a01:203", CALLING_AE_NOT_RECOGNIZED),  # IPv4-compatible, not IPv4-mapped
    ],
)
def test_access_of_the_documented_example(calling: str, called: str, client: str, expected: Rejection | None) -> None:
    assert check_access(DOCS_SPEC, calling, called, client) == expected


def test_called_ae_refusal_comes_first() -> None:
    """Both titles refused: the answer is 1-1-7 (called AE title not recognized).

    docs/configuration.md does not say which of the two wins; this pins what the code does, so that a change
    is deliberate. (The parser, for two *blank* titles, answers 1-1-3: it checks the calling title first.)
    """
    assert check_access(DOCS_SPEC, "BAD", "BAD", "10.9.9.9") == CALLED_AE_NOT_RECOGNIZED
    assert check_access(DOCS_SPEC, "US01", "BAD", "10.2.0.1") == CALLED_AE_NOT_RECOGNIZED


@pytest.mark.parametrize(
    ("pattern", "allowed", "refused"),
    [
        ("MR0?", ["MR01", "MR0X", "MR0-"], ["MR0", "MR010", "mr01"]),
        ("[UC]S01", ["US01", "CS01"], ["XS01", "us01", "UCS01"]),
        ("*", ["A", "ANY TITLE 16 CHR", "*"], []),
        ("*SCP", ["STORESCP", "SCP"], ["SCPX", "scp"]),
        ("A*B*C", ["ABC", "AxxBxxC"], ["ACB", "ABCD"]),
    ],
)
def test_calling_globs_follow_shell_rules(pattern: str, allowed: list[str], refused: list[str]) -> None:
    rules = spec(allowed_calling_ae=[pattern])
    for title in allowed:
        assert check_access(rules, title, "ANY", "10.0.0.1") is None, title
    for title in refused:
        assert check_access(rules, title, "ANY", "10.0.0.1") == CALLING_AE_NOT_RECOGNIZED, title


@pytest.mark.parametrize(
    ("pattern", "allowed", "refused"),
    [("ANY-*", ["ANY-SCP", "ANY-"], ["ANY", "any-scp"]), ("PACS?", ["PACS1", "PACSB"], ["PACS", "PACS12"])],
)
def test_called_globs_follow_shell_rules(pattern: str, allowed: list[str], refused: list[str]) -> None:
    rules = spec(called_ae=[pattern])
    for title in allowed:
        assert check_access(rules, "ANY", title, "10.0.0.1") is None, title
    for title in refused:
        assert check_access(rules, "ANY", title, "10.0.0.1") == CALLED_AE_NOT_RECOGNIZED, title


V6_SPEC = spec(
    allowed_calling_ae=[
        {"ae": "US*", "sources": ["10.1.0.0/16", "fd00:1::/32"]},
        {"ae": "LL*", "sources": ["fe80::/10"]},
        {"ae": "ONE", "sources": ["10.5.5.5", "fd00::5"]},  # a single address is a /32 or /128 network
    ]
)


@pytest.mark.parametrize(
    ("calling", "client", "allowed"),
    [
        ("US01", "fd00:1::5", True),
        ("US01", "fd00:1:ffff::5", True),
        ("US01", "FD00:0001:0000::0005", True),
        ("US01", "fd00:2::5", False),
        ("US01", "10.1.0.1", True),
        ("US01", "::ffff:10.1.0.1", True),
        ("US01", "::ffff:10.3.0.1", False),
        ("LL01", "fe80::1%eth0", True),  # the zone of a link-local peer address is not part of the address
        ("LL01", "fe80::1", True),
        ("LL01", "fd00:1::5", False),
        ("ONE", "10.5.5.5", True),
        ("ONE", "::ffff:10.5.5.5", True),
        ("ONE", "10.5.5.6", False),
        ("ONE", "fd00::5", True),
        ("ONE", "fd00::6", False),
        ("OTHER", "10.1.0.1", False),
    ],
)
def test_sources_with_ipv6_and_mapped_clients(calling: str, client: str, allowed: bool) -> None:
    expected = None if allowed else CALLING_AE_NOT_RECOGNIZED
    assert check_access(V6_SPEC, calling, "ANY", client) == expected


def test_any_matching_rule_admits() -> None:
    """A rule bound to networks does not shadow a later rule for the same title without them."""
    rules = spec(allowed_calling_ae=[{"ae": "US*", "sources": ["10.1.0.0/16"]}, "US02"])
    assert check_access(rules, "US02", "ANY", "10.9.9.9") is None
    assert check_access(rules, "US01", "ANY", "10.9.9.9") == CALLING_AE_NOT_RECOGNIZED
    assert check_access(rules, "US01", "ANY", "10.1.9.9") is None


def test_ipv4_mapped_source_network_admits_its_clients() -> None:
    """A source network written in IPv4-mapped form (as a dual-stack listener shows its clients) is accepted
    by the config, and the client ``::ffff:10.9.0.3`` is in ``::ffff:10.9.0.0/112``, so it must be allowed.

    check_access turns the *client* address into IPv4 but leaves the configured network IPv6, so this rule can
    never match anyone: the config loads and silently refuses every client it names.
    """
    rules = spec(allowed_calling_ae=[{"ae": "XA*", "sources": ["::ffff:10.9.0.0/112"]}])
    assert ipaddress.ip_address("::ffff:10.9.0.3") in ipaddress.ip_network("::ffff:10.9.0.0/112")
    assert check_access(rules, "XA01", "ANY", "::ffff:10.9.0.3") is None
    assert check_access(rules, "XA01", "ANY", "10.9.0.3") is None


# --- routing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calling", "called", "client", "servers"),
    [
        ("MR01", "INFINITT", "10.9.9.9", ("pacs2",)),
        ("MR", "ANYTHING", "fd00::1", ("pacs2",)),
        ("mr01", "INFINITT", "10.9.9.9", None),  # case-sensitive
        ("CT01", "ARCHIVE", "10.2.3.4", ("pacs3",)),
        ("CT01", "ARCHIVE", "::ffff:10.2.3.4", ("pacs3",)),
        ("CT01", "ARCHIVE", "10.3.0.1", None),  # every given criterion must match
        ("CT01", "INFINITT", "10.2.3.4", None),
        ("CT01", "archive", "10.2.3.4", None),
        ("CT01", "ARCHIVE", "fd00::10:2:3:4", None),
        ("MR01", "ARCHIVE", "10.2.3.4", ("pacs2",)),  # both match: the first rule wins
    ],
)
def test_routes_of_the_documented_example(
    calling: str, called: str, client: str, servers: tuple[str, ...] | None
) -> None:
    assert route(DOCS_SPEC, calling, called, client) == servers


def test_no_spec_or_no_routes_means_all_servers() -> None:
    assert route(None, "MR01", "INFINITT", "10.0.0.1") is None
    assert route(spec(), "MR01", "INFINITT", "10.0.0.1") is None
    assert route(spec(called_ae=["INFINITT"]), "MR01", "INFINITT", "10.0.0.1") is None


def test_route_with_each_criterion_alone() -> None:
    rules = spec(
        routes=[
            {"called_ae": "MWL", "servers": ["pacs1"]},
            {"source": "fd00:2::/32", "servers": ["pacs2", "pacs3"]},
            {"source": "10.7.0.0/16", "servers": ["pacs3"]},
            {"calling_ae": "[CM]R0?", "servers": ["pacs4"]},
        ]
    )
    assert route(rules, "CT01", "MWL", "10.0.0.1") == ("pacs1",)
    assert route(rules, "CT01", "INFINITT", "fd00:2::9") == ("pacs2", "pacs3")
    assert route(rules, "CT01", "INFINITT", "10.7.1.1") == ("pacs3",)
    assert route(rules, "CT01", "INFINITT", "::ffff:10.7.1.1") == ("pacs3",)
    assert route(rules, "CR01", "INFINITT", "10.0.0.1") == ("pacs4",)
    assert route(rules, "MR01", "INFINITT", "fe80::1%eth0") == ("pacs4",)
    assert route(rules, "CT01", "INFINITT", "10.0.0.1") is None


def test_route_with_ipv4_mapped_source_network() -> None:
    """Same fault as for access control: a route on ``::ffff:10.9.0.0/112`` never matches its clients."""
    rules = spec(routes=[{"source": "::ffff:10.9.0.0/112", "servers": ["pacs9"]}])
    assert route(rules, "CT01", "ANY", "::ffff:10.9.0.3") == ("pacs9",)


# --- properties: models of access and routing --------------------------------------------------------

# exact AE titles (no glob characters), as the parser yields them: no surrounding spaces, 1 to 16 characters
titles = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\*?["), min_size=1, max_size=8
)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: ipaddress.IPv4Address(n))
ipv4_networks = st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False), ipv4, st.integers(8, 32))


def as_client(address: ipaddress.IPv4Address, mapped: bool) -> str:
    return f"::ffff:{address}" if mapped else str(address)


@PROPERTY
@given(
    rules=st.lists(st.tuples(st.sampled_from(["A", "B", "C"]), st.none() | ipv4_networks), min_size=1, max_size=5),
    calling=st.sampled_from(["A", "B", "C", "D"]),
    called=st.sampled_from(["X", "Y"]),
    address=ipv4,
    mapped=st.booleans(),
)
def test_access_model(
    rules: list[tuple[str, ipaddress.IPv4Network | None]],
    calling: str,
    called: str,
    address: ipaddress.IPv4Address,
    mapped: bool,
) -> None:
    """Allowed iff the called title is accepted and some rule names the calling title from the client's network."""
    given_rules = [title if net is None else {"ae": title, "sources": [str(net)]} for title, net in rules]
    rules_spec = spec(allowed_calling_ae=given_rules, called_ae=["X"])
    if called != "X":
        expected: Rejection | None = CALLED_AE_NOT_RECOGNIZED
    elif any(title == calling and (net is None or address in net) for title, net in rules):
        expected = None
    else:
        expected = CALLING_AE_NOT_RECOGNIZED
    assert check_access(rules_spec, calling, called, as_client(address, mapped)) == expected


@PROPERTY
@given(
    rules=st.lists(st.sampled_from(["CT*", "MR01", "US?", "*X"]), min_size=1, max_size=3),
    extra=st.sampled_from(["CT*", "MR01", "US?", "*X", "Z*"]),
    calling=titles,
    address=ipv4,
)
def test_adding_an_allowed_title_never_refuses_anyone(
    rules: list[str], extra: str, calling: str, address: ipaddress.IPv4Address
) -> None:
    before = check_access(spec(allowed_calling_ae=rules), calling, "ANY", str(address))
    after = check_access(spec(allowed_calling_ae=[*rules, extra]), calling, "ANY", str(address))
    assert before in (None, CALLING_AE_NOT_RECOGNIZED)
    if before is None:
        assert after is None


@PROPERTY
@given(
    routes=st.lists(
        st.tuples(
            st.none() | st.sampled_from(["A", "B"]),
            st.none() | st.sampled_from(["X", "Y"]),
            st.none() | ipv4_networks,
            st.lists(st.sampled_from(["p1", "p2", "p3"]), min_size=1, max_size=3),
        ),
        max_size=5,
    ),
    calling=st.sampled_from(["A", "B", "C"]),
    called=st.sampled_from(["X", "Y", "Z"]),
    address=ipv4,
    mapped=st.booleans(),
)
def test_route_model_first_match_wins(
    routes: list[tuple[str | None, str | None, ipaddress.IPv4Network | None, list[str]]],
    calling: str,
    called: str,
    address: ipaddress.IPv4Address,
    mapped: bool,
) -> None:
    given_routes = []
    for calling_ae, called_ae, source, servers in routes:
        entry: dict[str, Any] = {"servers": servers}
        if calling_ae is not None:
            entry["calling_ae"] = calling_ae
        if called_ae is not None:
            entry["called_ae"] = called_ae
        if source is not None:
            entry["source"] = str(source)
        given_routes.append(entry)
    expected = next(
        (
            tuple(servers)
            for calling_ae, called_ae, source, servers in routes
            if calling_ae in (None, calling) and called_ae in (None, called) and (source is None or address in source)
        ),
        None,
    )
    assert route(spec(routes=given_routes), calling, called, as_client(address, mapped)) == expected


# --- persistence keys ------------------------------------------------------------------------------


def test_every_dicom_persistence_type_has_a_key() -> None:
    for kind in PERSISTENCE_BY_MODE["dicom"]:
        key = persistence_key(kind, "CT01", "10.0.0.1")
        assert (key is None) == (kind == "none"), kind


@pytest.mark.parametrize("kind", ["cookie", "cookie+source_ip", "calling_ae+cookie", "", "CALLING_AE"])
def test_types_mode_dicom_cannot_carry_out_are_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="not available in mode dicom"):
        persistence_key(kind, "CT01", "10.0.0.1")


@pytest.mark.parametrize(
    ("kind", "calling", "client", "prefix4", "prefix6", "key"),
    [
        ("none", "CT01", "10.1.2.3", 32, 128, None),
        ("source_ip", "CT01", "10.1.2.3", 32, 128, "10.1.2.3"),
        ("source_ip", "CT01", "10.1.2.3", 24, 128, "10.1.2.0"),
        ("source_ip", "CT01", "::ffff:10.1.2.3", 24, 128, "10.1.2.0"),
        ("calling_ae", "CT01", "10.1.2.3", 32, 128, "ae:CT01"),
        ("calling_ae", "CT01", "fd00::1", 32, 64, "ae:CT01"),
        ("calling_ae", "ct01", "10.1.2.3", 32, 128, "ae:ct01"),
        ("calling_ae+source_ip", "CT01", "10.1.2.3", 32, 128, "ae:CT01@10.1.2.3"),
        ("calling_ae+source_ip", "CT01", "10.1.2.3", 24, 128, "ae:CT01@10.1.2.0"),
        ("calling_ae+source_ip", "CT01", "::ffff:10.1.2.3", 16, 128, "ae:CT01@10.1.0.0"),
        ("calling_ae+source_ip", "MR01", "fd00:1:2:3:4:5:6:7", 24, 64, "ae:MR01@fd00:1:2:3::"),
        ("calling_ae+source_ip", "MR01", "fe80::1%eth0", 32, 128, "ae:MR01@fe80::1"),
        ("calling_ae+source_ip", "A 1", "10.1.2.3", 32, 128, "ae:A 1@10.1.2.3"),
    ],
)
def test_persistence_keys(kind: str, calling: str, client: str, prefix4: int, prefix6: int, key: str | None) -> None:
    assert persistence_key(kind, calling, client, prefix4, prefix6) == key


def test_two_modalities_behind_one_nat_address_get_their_own_keys() -> None:
    nat = "192.0.2.10"
    for kind in ("calling_ae", "calling_ae+source_ip"):
        assert persistence_key(kind, "CT01", nat) != persistence_key(kind, "MR01", nat)
    # which is what source_ip alone cannot do
    assert persistence_key("source_ip", "CT01", nat) == persistence_key("source_ip", "MR01", nat)


def test_netmask_applies_to_the_source_part_only() -> None:
    same_net = persistence_key("calling_ae+source_ip", "CT01", "10.1.2.3", 24)
    assert same_net == persistence_key("calling_ae+source_ip", "CT01", "10.1.2.200", 24)
    assert same_net != persistence_key("calling_ae+source_ip", "CT01", "10.1.3.3", 24)
    assert same_net != persistence_key("calling_ae+source_ip", "CT02", "10.1.2.3", 24)
    # calling_ae alone ignores the address, whatever the netmask
    assert persistence_key("calling_ae", "CT01", "10.1.2.3", 8) == persistence_key("calling_ae", "CT01", "fd00::1")


ae_with_separators = st.text(alphabet=st.sampled_from(list("AB01@:. ")), min_size=1, max_size=6).map(
    lambda s: s.strip(" ") or "A"
)
addresses = st.one_of(
    ipv4.map(str),
    ipv4.map(lambda a: f"::ffff:{a}"),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
)


@settings(max_examples=120, deadline=None)
@given(
    first=st.tuples(ae_with_separators, addresses),
    second=st.tuples(ae_with_separators, addresses),
    prefix4=st.sampled_from([32, 24, 16, 0]),
    prefix6=st.sampled_from([128, 64, 48, 0]),
)
def test_calling_ae_source_ip_keys_are_injective(
    first: tuple[str, str], second: tuple[str, str], prefix4: int, prefix6: int
) -> None:
    """Equal keys exactly when both the AE title and the masked source are equal (even with '@' in titles)."""
    (ae1, ip1), (ae2, ip2) = first, second
    key1 = persistence_key("calling_ae+source_ip", ae1, ip1, prefix4, prefix6)
    key2 = persistence_key("calling_ae+source_ip", ae2, ip2, prefix4, prefix6)
    same_source = source_ip_key(ip1, prefix4, prefix6) == source_ip_key(ip2, prefix4, prefix6)
    assert (key1 == key2) == (ae1 == ae2 and same_source)
    assert (persistence_key("calling_ae", ae1, ip1) == persistence_key("calling_ae", ae2, ip2)) == (ae1 == ae2)


def test_the_most_informative_transient_rejection_is_the_first_that_gives_a_reason() -> None:
    user_none, acse_none = Rejection(2, 1, 1), Rejection(2, 2, 1)
    congestion, limit, version = Rejection(2, 3, 1), Rejection(2, 3, 2), Rejection(2, 2, 2)
    assert most_informative([user_none, acse_none, limit, congestion]) == 2
    assert most_informative([congestion, limit]) == 0  # both say why: the first node offered
    assert most_informative([acse_none, version]) == 1
    assert most_informative([user_none, acse_none]) == 0  # none says why: the first


@PROPERTY
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 7)), min_size=1, max_size=6))
def test_most_informative_picks_one_that_gives_a_reason_whenever_one_does(fields: list[tuple[int, int]]) -> None:
    rejections = [Rejection(2, source, reason) for source, reason in fields]
    best = rejections[most_informative(rejections)]
    says_why = [r for r in rejections if (r.source, r.reason) not in {(1, 1), (2, 1)}]
    assert best == (says_why[0] if says_why else rejections[0])
