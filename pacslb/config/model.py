"""The config as typed, immutable objects.

These models describe the YAML contract of docs/configuration.md. Each field has its default next to
it, with the reason for it when the number is not obvious. Loading (YAML, line numbers, error
collection) lives in loader.py; rules that relate several fields live in :func:`semantic_issues`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from pacslb.config.values import (
    HostPort,
    StoreLocation,
    format_duration,
    format_rate,
    parse_ae_title,
    parse_duration,
    parse_host_port,
    parse_prefix,
    parse_rate,
    parse_store_location,
)

Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
Address = Annotated[HostPort, BeforeValidator(parse_host_port), PlainSerializer(str)]
AETitle = Annotated[str, BeforeValidator(parse_ae_title)]
Prefix4 = Annotated[int, BeforeValidator(lambda v: parse_prefix(v, bits=32))]
Prefix6 = Annotated[int, BeforeValidator(lambda v: parse_prefix(v, bits=128))]
Rate = Annotated[float, BeforeValidator(parse_rate), PlainSerializer(format_rate)]

Mode = Literal["tcp", "dicom", "http"]
#: Modes this version can run; the others are part of the contract and refused with a clear reason.
SUPPORTED_MODES: frozenset[str] = frozenset({"tcp", "dicom", "http"})
PersistenceType = Literal["none", "source_ip", "cookie", "cookie+source_ip", "calling_ae", "calling_ae+source_ip"]
#: Which persistence types each mode can carry out (cookies need HTTP, AE titles need DICOM).
PERSISTENCE_BY_MODE: dict[str, frozenset[str]] = {
    "tcp": frozenset({"none", "source_ip"}),
    "dicom": frozenset({"none", "source_ip", "calling_ae", "calling_ae+source_ip"}),
    "http": frozenset({"none", "source_ip", "cookie", "cookie+source_ip"}),
}

#: More relay processes than this gains nothing on any machine pacslb is meant for.
MAX_WORKERS = 64

#: Weights as HAProxy has them: 0 takes no new connections from the scheduler, 256 is the most.
MAX_WEIGHT = 256


class FrozenDict(dict[str, Any]):
    """A dict that refuses changes, so that a loaded config is immutable all the way down."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("the config is immutable; load a new one instead")

    __setitem__ = __delitem__ = _refuse
    pop = popitem = clear = update = setdefault = __ior__ = _refuse  # type: ignore[assignment]

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self  # immutable: a copy is the same thing

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return FrozenDict, (dict(self),)


def _freeze(value: dict[str, Any]) -> dict[str, Any]:
    return FrozenDict(value)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _ip_address(value: Any) -> Any:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ValueError(f"expected an IP address, e.g. '10.0.0.2' (got {value!r})") from None


class ServerSpec(_Frozen):
    """One PACS node behind a service. The same name in several services is the same node."""

    address: Address
    weight: Annotated[int, Field(ge=0, le=MAX_WEIGHT)] = 1


class PersistenceSpec(_Frozen):
    """Keeps a client on the node it started with."""

    type: PersistenceType = "none"
    # How long a client's entry outlives the end of its last connection. 30 min covers the gap between
    # the series of one exam; a study itself may last longer than this, which is why it counts from the end.
    timeout: PositiveDuration = 30 * 60.0
    netmask: Prefix4 = 32  # clients in one IPv4 network of this size share one entry
    netmask6: Prefix6 = 128
    # Bound on the table so a scan from many addresses cannot exhaust memory (HAProxy-equivalent configs
    # use a 100k stick table); the least recently used entry goes first.
    max_entries: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    cookie: str = "SERVERID"


CheckType = Literal["tcp", "http", "dicom_echo", "none"]
HTTP_CHECK_FIELDS = frozenset({"method", "path", "host", "expect_status", "expect_body", "max_clock_skew"})
DICOM_CHECK_FIELDS = frozenset({"calling_ae", "called_ae"})


class CheckSpec(_Frozen):
    """How a service checks its nodes' health."""

    type: CheckType = "tcp"
    interval: PositiveDuration = 2.0
    # Not given: 2s, or the interval when that is shorter (a check must end before the next one starts; a
    # timeout the user never set must not fight the interval they did).
    timeout: PositiveDuration = 2.0
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 3
    port: Annotated[int, Field(ge=1, le=65535)] | None = None  # check this port instead of the server's
    method: Literal["HEAD", "GET"] = "HEAD"
    path: str = "/"
    host: str | None = None  # Host header; default: the server's address
    expect_status: Annotated[tuple[Annotated[int, Field(ge=100, le=599)], ...], Field(min_length=1)] = (200,)
    expect_body: str | None = None  # substring the body must contain (GET only)
    # A node whose Date header is further than this from pacslb's clock is reported (a warning in the log):
    # PACS nodes with drifting clocks misorder studies. Date has a resolution of one second, hence not less.
    max_clock_skew: Annotated[Duration, Field(ge=1)] = 5.0
    calling_ae: AETitle = "PACSLB"
    called_ae: AETitle = "ANY-SCP"

    @model_validator(mode="after")
    def _timeout_follows_a_shorter_interval(self) -> CheckSpec:
        if "timeout" not in self.model_fields_set and self.interval < self.timeout:
            object.__setattr__(self, "timeout", self.interval)
        return self

    @field_validator("path")
    @classmethod
    def _path_is_origin_form(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in " \r\n"):
            raise ValueError(f"must start with '/' and contain no spaces (got {value!r})")
        return value


class TimeoutsSpec(_Frozen):
    """Per-service time limits."""

    connect: PositiveDuration = 5.0  # a node that does not answer a SYN within this is skipped
    # mode dicom: how long a client may take to send its A-ASSOCIATE-RQ. Peers answer in milliseconds; 10 s
    # is generous and still frees a silent client's slot quickly.
    negotiation: PositiveDuration = 10.0
    # mode dicom: how long a node may take to answer the A-ASSOCIATE-RQ before the next node is offered it
    # (and the node is checked at once). Short, so that a hung node costs a modality seconds, not its own
    # timeout; unset, it is also no longer than a shorter ``negotiation`` (the user's own setting).
    node_answer: PositiveDuration = 3.0
    # An association can sit idle between studies for hours; appliances default both sides to 12 h.
    client_idle: PositiveDuration = 12 * 3600.0
    server_idle: PositiveDuration = 12 * 3600.0

    @model_validator(mode="after")
    def _node_answer_follows_a_shorter_negotiation(self) -> TimeoutsSpec:
        if "node_answer" not in self.model_fields_set and self.negotiation < self.node_answer:
            object.__setattr__(self, "node_answer", self.negotiation)
        return self


def _network(value: Any) -> Any:
    if isinstance(value, str):
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"not a network: {value!r} (use e.g. 10.1.0.0/16 or 10.1.2.3)") from None
        mapped = network.network_address.ipv4_mapped if isinstance(network, ipaddress.IPv6Network) else None
        if mapped is not None and network.prefixlen >= 96:
            # ::ffff:10.9.0.0/112 is 10.9.0.0/16: clients are compared as IPv4, so the network is too.
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96), strict=False)
        return network
    raise ValueError(f"expected a network such as 10.1.0.0/16 (got {value!r})")


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network), PlainSerializer(str)]
AEPattern = Annotated[str, Field(min_length=1, max_length=16)]  # an AE title or a glob such as "CT*"


class CallingAERule(_Frozen):
    """An allowed calling AE title (glob), optionally only from some source networks."""

    ae: AEPattern
    sources: Annotated[tuple[Network, ...], Field(min_length=1)] | None = None


def _calling_rule(value: Any) -> Any:
    return {"ae": value} if isinstance(value, str) else value


class DicomRoute(_Frozen):
    """Send matching associations to a subset of the servers. Absent criteria match anything."""

    calling_ae: AEPattern | None = None
    called_ae: AEPattern | None = None
    source: Network | None = None
    servers: Annotated[tuple[str, ...], Field(min_length=1)]


def _readable_file(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a file path (got {value!r})")
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError(f"cannot read file {value!r}")
    return value


ReadableFile = Annotated[str, AfterValidator(_readable_file)]


IdentityPattern = Annotated[str, Field(min_length=1, max_length=255)]  # a certificate name or a glob


def _loads(certificate: str | None, key: str | None, *bundles: str | None) -> None:
    """Raise ValueError (named for the config's error line) unless the PEM files load as OpenSSL reads
    them at start: a certificate with its key, CA bundles, CRLs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        if certificate is not None and key is not None:
            context.load_cert_chain(certificate, key)
        for bundle in bundles:
            if bundle is not None:
                context.load_verify_locations(cafile=bundle)
    except ssl.SSLError as exc:
        raise ValueError(f"the certificate files do not load: {exc.reason or exc}") from None


class DicomTlsSpec(_Frozen):
    """mode dicom: TLS on the service's listener (DICOM PS3.15 annex B, the secure transport profiles)."""

    certificate: ReadableFile  # PEM, the server certificate followed by its chain
    key: ReadableFile  # PEM private key
    # bcp195: TLS 1.2 or 1.3 with forward-secret AEAD suites only, as BCP 195 (RFC 9325, RFC 8996) and
    # dcmtk's --profile-8996 ask; system: the system's default policy (still TLS 1.2 or later).
    profile: Literal["bcp195", "system"] = "bcp195"
    min_version: Literal["1.2", "1.3"] = "1.2"
    # Whether a client must show a certificate signed by ``ca``: none, optional (checked when shown), required.
    client_certificate: Literal["none", "optional", "required"] = "none"
    ca: ReadableFile | None = None  # PEM bundle of the CAs client certificates must chain to
    crl: ReadableFile | None = None  # PEM certificate revocation list(s) of those CAs
    # Calling AE title (glob) -> the certificate identities (subject CN or DNS subjectAltName; globs) that
    # may use it. When given, it is the whole list: a calling AE title no key matches, or a certificate no
    # pattern of the first matching key names, is rejected with A-ASSOCIATE-RJ 1-1-3.
    ae_identities: dict[AEPattern, tuple[IdentityPattern, ...]] | None = None

    @model_validator(mode="after")
    def _client_certificates_need_a_ca(self) -> DicomTlsSpec:
        if self.client_certificate != "none" and self.ca is None:
            raise ValueError(f"client_certificate: {self.client_certificate} needs ca (the CAs to check them with)")
        if self.crl is not None and self.client_certificate == "none":
            raise ValueError("crl is used only to check client certificates (client_certificate: optional or required)")
        if self.ae_identities is not None and self.client_certificate == "none":
            raise ValueError("ae_identities needs client certificates (client_certificate: required or optional)")
        _loads(self.certificate, self.key, self.ca, self.crl)
        return self


class NodeTlsSpec(_Frozen):
    """mode dicom: TLS from the balancer to the nodes (their certificates checked against ``ca``)."""

    ca: ReadableFile  # PEM bundle of the CAs the nodes' certificates must chain to
    # The name the nodes' certificates must carry (DNS or IP subjectAltName); not given: the chain is
    # checked, not the name (nodes are usually addressed by IP, and certificates made for their host names).
    server_name: str | None = None
    certificate: ReadableFile | None = None  # the balancer's client certificate, for nodes that ask for one
    key: ReadableFile | None = None
    profile: Literal["bcp195", "system"] = "bcp195"
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _certificate_and_key_together(self) -> NodeTlsSpec:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("certificate and key go together")
        _loads(self.certificate, self.key, self.ca)
        return self


class DicomSpec(_Frozen):
    """mode dicom: what the balancer does with the A-ASSOCIATE-RQ."""

    # Calling AE titles allowed in (globs, optionally bound to networks); absent = any.
    allowed_calling_ae: tuple[Annotated[CallingAERule, BeforeValidator(_calling_rule)], ...] | None = None
    called_ae: tuple[AEPattern, ...] | None = None  # called AE titles accepted (globs); absent = any
    routes: tuple[DicomRoute, ...] = ()  # first match wins; no match = all servers
    tls: DicomTlsSpec | None = None  # TLS on the listener; none: plain DICOM
    # balance: the nodes share the service's associations. called_ae: each server is a destination named by
    # its AE title, and an association goes to the one its called AE title names (the associations a PACS
    # node opens towards modalities: C-MOVE sub-operations, storage commitment reports).
    destination: Literal["balance", "called_ae"] = "balance"
    node_tls: NodeTlsSpec | None = None  # TLS to the nodes (and their health checks); none: plain


class CookieSpec(_Frozen):
    """mode http: the persistence cookie the balancer inserts (persistence.cookie names it)."""

    # The balancer's cookie is taken out of requests before they reach the node, and not set again while
    # the client's one is valid: the node never sees it, the client never gets it twice.
    indirect: bool = True
    # Responses that set the cookie are made private, so a shared cache never gives one client's cookie
    # to another (who would then all land on one node).
    nocache: bool = True
    httponly: bool = True  # page scripts have no business with it
    samesite: Literal["Lax", "Strict", "None"] | None = "Lax"
    secure: Literal["auto", "always", "never"] = "auto"  # auto: Secure when the service terminates TLS
    path: str = "/"
    domain: str | None = None
    # None: a session cookie (gone when the browser closes), like HAProxy's default.
    max_age: Annotated[Duration, Field(gt=0)] | None = None
    # Key of the HMAC that makes cookie values (balance/cookie.py); the same on both balancers of a pair.
    secret: Annotated[str, Field(min_length=8)] | None = None


class ForwardSpec(_Frozen):
    """mode http: forwarding fields added to each request for the node."""

    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    forwarded: bool = False  # RFC 7239 Forwarded; off by default, as most PACS web servers read X-Forwarded-*


class HttpLimitsSpec(_Frozen):
    """mode http: bounds on what a client can make the balancer hold."""

    # Browsers send a few KiB; a viewer's cookies and query strings can reach 16-32 KiB (nginx accepts
    # 4 x 8 KiB lines). Above it: 431.
    max_head_size: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    max_headers: Annotated[int, Field(ge=8, le=1000)] = 100  # HAProxy's default is 101


class HttpTimeoutsSpec(_Frozen):
    """mode http: time limits of the HTTP exchange (``timeouts.connect`` applies too)."""

    # The whole request head must arrive within this from its first byte (or from the connection's
    # start): a client trickling its head (slowloris) gets 408 and is closed.
    request_head: PositiveDuration = 10.0
    # How long a client connection may sit between requests. Browsers keep idle connections 1-5 minutes
    # and open new ones freely; an idle one costs a socket.
    keep_alive: PositiveDuration = 60.0
    # A client that sends no byte of its request body, or reads no byte of the response, for this long.
    client: PositiveDuration = 60.0
    # A node that sends no byte of its response for this long: 504 if nothing was sent yet. A PACS can
    # take minutes to build a study archive before its first byte, hence generous.
    server: PositiveDuration = 5 * 60.0
    # An idle pooled connection to a node is closed after this: shorter than the keep-alive timeout of
    # common servers (Apache 5 s, nginx 75 s), so the node seldom closes one just as it is reused.
    pool_idle: PositiveDuration = 4.0


class TlsSpec(_Frozen):
    """mode http: TLS termination on the service's listener."""

    certificate: ReadableFile  # PEM, the server certificate followed by its chain
    key: ReadableFile  # PEM private key
    min_version: Literal["1.2", "1.3"] = "1.2"
    # A plain-HTTP listener that answers every request with a redirect (308) to this service's https URL.
    redirect_from: Address | None = None


class HttpSpec(_Frozen):
    """mode http: the reverse proxy's settings."""

    cookie: CookieSpec = CookieSpec()
    forward: ForwardSpec = ForwardSpec()
    # When no node can serve: 503 with this HTML page (a file) and Retry-After, or the fallback server.
    maintenance_page: ReadableFile | None = None
    retry_after: Annotated[Duration, Field(ge=1)] = 30.0
    fallback: Address | None = None  # a server that gets every request while no node can serve
    limits: HttpLimitsSpec = HttpLimitsSpec()
    timeouts: HttpTimeoutsSpec = HttpTimeoutsSpec()
    tls: TlsSpec | None = None
    # Idle keep-alive connections kept per node: enough for a burst of parallel browser requests to find
    # one ready, few enough not to hold a node's worker slots (Orthanc serves 50 at once by default).
    pool_size: Annotated[int, Field(ge=0, le=10_000)] = 32


def _none_is_off(value: Any) -> Any:
    """``none`` (or an empty value) turns a limit off."""
    return None if value is None or (isinstance(value, str) and value.strip().lower() == "none") else value


#: A per-client limit: a count from 1 up, or ``none`` for no limit.
ClientCount = Annotated[Annotated[int, Field(ge=1, le=1_000_000)] | None, BeforeValidator(_none_is_off)]
#: Fields of ``limits`` that only mode dicom can apply (it alone reads the calling AE title).
DICOM_LIMIT_FIELDS = frozenset({"calling_ae_maxconn", "client_ae_titles"})


class LimitsSpec(_Frozen):
    """Per-client bounds of one service, so that one client cannot take every slot of ``maxconn`` (or the
    balancer's time, or the persistence table) from all the others. A *client* is a source network:
    addresses in one network of ``netmask`` (IPv4) or ``netmask6`` (IPv6) bits count as one. Each bound is
    far above what a hospital's busiest single address needs (a router, a PACS moving studies, a terminal
    server with dozens of viewer sessions) and far below what a client stuck in a loop takes."""

    # Connections one client may hold open at once. A modality holds 1-4 associations, a PACS or a DICOM
    # router moving studies 8-32, a browser 6 per site, a terminal server with 40 viewer sessions about 250.
    # 256 is a sixteenth of the default maxconn: 16 greedy clients are needed to fill the service.
    client_maxconn: ClientCount = 256
    # New connections a client may open per second, on average (a token bucket refilled at this rate).
    # A hospital's whole day peaks at tens a second from one address (a modality that opens an association
    # per image); a client in a retry loop, or a script, opens thousands.
    client_rate: Annotated[Rate | None, BeforeValidator(_none_is_off)] = 100.0
    # ... and at once, after a quiet spell (the bucket's size): a NAT or terminal server whose users all
    # log in at 8:00, a router flushing its queue after an outage. It refills in client_burst/client_rate s.
    client_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    # Which addresses count as one client. 32: each IPv4 address on its own. IPv6: 128 as well, because on a
    # hospital LAN a /64 is a whole VLAN of workstations, and a host uses one address at a time for new
    # connections (use 64 where a single host may rotate through its /64).
    netmask: Prefix4 = 32
    netmask6: Prefix6 = 128
    # mode dicom: associations open at once with one calling AE title, from any address. A modality uses
    # 1-4, a PACS or a router moving studies up to 32; 64 stops an AE title (a default title that a
    # runaway script shares) from holding the service while leaving room for a busy archive.
    calling_ae_maxconn: ClientCount = 64
    # mode dicom with persistence by calling AE: distinct calling AE titles one client may have in the
    # persistence table at once (an AE title counts until its entry would expire, persistence.timeout
    # after its last association ended). A DICOM router that keeps its modalities' titles sends a few dozen;
    # a client inventing titles would otherwise fill the table and push every other client's entry out.
    client_ae_titles: ClientCount = 256

    @property
    def per_client(self) -> bool:
        """Whether any limit applies at accept (concurrent connections or rate)."""
        return self.client_maxconn is not None or self.client_rate is not None


def _server_shorthand(value: Any) -> Any:
    """Allow ``pacs1: 10.0.0.11:104`` as shorthand for ``pacs1: {address: 10.0.0.11:104}``."""
    if isinstance(value, dict):
        return {name: {"address": spec} if isinstance(spec, str) else spec for name, spec in value.items()}
    return value


class ServiceSpec(_Frozen):
    """One virtual service: a listening address in front of a set of nodes."""

    listen: Address
    mode: Mode = "tcp"
    # consistent: rendezvous hashing of the client's persistence key, the same node on every balancer
    # with no shared state (balance/consistent.py); round robin without persistence.
    balance: Literal["leastconn", "roundrobin", "consistent"] = "leastconn"
    persistence: PersistenceSpec = PersistenceSpec()
    check: CheckSpec = CheckSpec()
    servers: Annotated[
        dict[str, ServerSpec], BeforeValidator(_server_shorthand), AfterValidator(_freeze), Field(min_length=1)
    ]
    timeouts: TimeoutsSpec = TimeoutsSpec()
    dicom: DicomSpec | None = None  # mode dicom only
    http: HttpSpec | None = None  # mode http only (absent: every default)
    # Past this many concurrent connections the service stops accepting; new clients wait in the
    # kernel's accept queue (like HAProxy's frontend maxconn) instead of being refused.
    maxconn: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    # Other nodes tried after a failed connect, each at most once.
    retries: Annotated[int, Field(ge=0, le=16)] = 3
    # Per-client bounds (connections, rate, and in mode dicom AE titles); see LimitsSpec.
    limits: LimitsSpec = LimitsSpec()
    # The address connections to the servers come from (a virtual IP, so that a modality sees the
    # balancer's address whichever balancer holds it); absent: the system chooses.
    source: Annotated[str, BeforeValidator(_ip_address)] | None = None
    # v2: each node connection starts with a PROXY protocol v2 header giving the client's address (modes tcp
    # and dicom; nginx's `listen ... proxy_protocol`, HAProxy's `accept-proxy`); none: nothing is added.
    proxy_protocol: Literal["none", "v2"] = "none"


class LogSpec(_Frozen):
    """Where and how pacslb logs (always to standard error, one line per event)."""

    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


#: Where the admin API listens when ``admin:`` is given without ``listen``: loopback only, so that nobody
#: on the network can drain a PACS node unless an administrator chose to open it (with a token).
DEFAULT_ADMIN_LISTEN = HostPort("127.0.0.1", 9900)
#: A bearer token shorter than this could be guessed by trying: 16 random characters are out of reach.
MIN_TOKEN_LENGTH = 16
#: SMTP port when ``alerts.email.server`` names none (submission with STARTTLS is 587, plain relay 25).
DEFAULT_SMTP_PORT = 25


def _is_loopback(address: HostPort) -> bool:
    return ipaddress.ip_address(address.host).is_loopback


_HOST_NAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _host_name(value: Any) -> Any:
    """A DNS name as a Host header names it, in lower case (no port, no address: those need no entry)."""
    if not isinstance(value, str) or _HOST_NAME.fullmatch(value.strip().rstrip(".")) is None:
        raise ValueError(f"expected a host name such as lb1.hospital.example (got {value!r})")
    return value.strip().rstrip(".").lower()


class AdminSpec(_Frozen):
    """The admin API, dashboard and metrics (pacslb/admin). Absent from the file: no admin listener."""

    listen: Address = DEFAULT_ADMIN_LISTEN
    # A file holding the bearer token (one line). With it, every write needs ``Authorization: Bearer TOKEN``;
    # reads need it too when the listener is not on loopback. Re-read on reload.
    token_file: ReadableFile | None = None
    # Where admin states (drain, halt) and weights set at run time are kept, so that they survive a
    # restart. Absent: they survive reloads only.
    state_file: str | None = None
    # Host names the API and dashboard are also served under (the balancer's own DNS names, e.g.
    # lb1.hospital.example): besides these, only IP addresses of the listener and localhost are, so that a
    # page elsewhere cannot reach the API by pointing a name of its own at it (DNS rebinding).
    hosts: tuple[Annotated[str, BeforeValidator(_host_name)], ...] = ()

    @field_validator("state_file")
    @classmethod
    def _state_dir_exists(cls, value: str | None) -> str | None:
        if value is None:
            return value
        folder = os.path.dirname(os.path.abspath(value))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"folder {folder!r} does not exist or is not writable")
        return value

    @field_validator("token_file")
    @classmethod
    def _token_long_enough(cls, value: str | None) -> str | None:
        if value is not None:
            with open(value, encoding="utf-8", errors="replace") as handle:
                token = handle.readline().strip()
            if len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(f"the token in {value!r} is shorter than {MIN_TOKEN_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminSpec:
        if not _is_loopback(self.listen) and self.token_file is None:
            raise ValueError(f"listen {self.listen} is reachable from the network: it needs a token_file")
        return self


def _smtp_server(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected 'host' or 'host:port', e.g. 'mail.example.org:587' (got {value!r})")
    text = value.strip()
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep:
        host, port = text, str(DEFAULT_SMTP_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected 'host' or 'host:port' with a port from 1 to 65535 (got {value!r})")
    return (host, int(port))


class EmailSpec(_Frozen):
    """alerts by email. Unlike node addresses, the mail server may be a host name: if DNS fails, only the
    alert fails (and is logged), never the balancing."""

    server: Annotated[tuple[str, int], BeforeValidator(_smtp_server)]
    starttls: bool = False  # upgrade the connection with STARTTLS before logging in (submission port 587)
    username: str | None = None
    password_file: ReadableFile | None = None  # the password, one line; needs username
    sender: Annotated[str, Field(min_length=3)]
    recipients: Annotated[tuple[Annotated[str, Field(min_length=3)], ...], Field(min_length=1)]
    # A mail server that does not answer within this is given up on for this message (it is logged).
    timeout: PositiveDuration = 10.0

    @model_validator(mode="after")
    def _login_complete(self) -> EmailSpec:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


class WebhookSpec(_Frozen):
    """alerts as a JSON POST to a URL (chat systems, incident tools)."""

    url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    timeout: PositiveDuration = 5.0


AlertEvent = Literal["health", "service", "admin", "reload"]


class AlertsSpec(_Frozen):
    """Alerts when something changes: by email, webhook, or both."""

    email: EmailSpec | None = None
    webhook: WebhookSpec | None = None
    # What is worth a message: health (a server up/down), service (a service left with no usable server, or
    # back), admin (drain/halt/online), reload (applied or refused).
    events: Annotated[tuple[AlertEvent, ...], Field(min_length=1)] = ("health", "service")
    # Events within this time of the first are sent together in one message: a node going down in four
    # services at once is one mail, not four.
    batch: Annotated[Duration, Field(ge=0)] = 10.0
    # At most this many messages per hour and channel; past it, events are kept and summarised in the next
    # message allowed, so a flapping node cannot flood a mailbox but nothing is lost.
    max_per_hour: Annotated[int, Field(ge=1, le=3600)] = 12

    @model_validator(mode="after")
    def _has_channel(self) -> AlertsSpec:
        if self.email is None and self.webhook is None:
            raise ValueError("give email, webhook or both (alerts without a channel go nowhere)")
        return self


Store = Annotated[StoreLocation, BeforeValidator(parse_store_location), PlainSerializer(str)]

#: A balancer's name in the cluster: it is written in the shared store and in log lines.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _node_name(value: Any) -> Any:
    if not isinstance(value, str) or _NODE_NAME.fullmatch(value) is None:
        raise ValueError(f"expected a name of letters, digits, '.', '_' and '-', 1 to 63 long (got {value!r})")
    return value


def _default_node_name() -> str:
    name = socket.gethostname().split(".")[0] or "pacslb"
    return name if _NODE_NAME.fullmatch(name) else "pacslb"


def _interface_address(value: Any) -> Any:
    """A virtual IP with its prefix length: ``10.0.0.100/24`` (an address alone is a /32 or /128)."""
    if not isinstance(value, str):
        raise ValueError(f"expected an address with its prefix, e.g. '10.0.0.100/24' (got {value!r})")
    try:
        return str(ipaddress.ip_interface(value.strip()))
    except ValueError:
        raise ValueError(f"expected an address with its prefix, e.g. '10.0.0.100/24' (got {value!r})") from None


class VrrpSpec(_Frozen):
    """The virtual IP that keepalived moves between the balancers of a pair (read by ``pacslb keepalived``
    only: pacslb never speaks VRRP itself). See docs/high-availability.md for what each timer means."""

    interface: Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[A-Za-z0-9_.:@-]+$")]
    router_id: Annotated[int, Field(ge=1, le=255)]  # the same on both balancers, unique on the network
    priority: Annotated[int, Field(ge=1, le=254)] = 100  # the higher one holds the address
    virtual_ips: Annotated[
        tuple[Annotated[str, BeforeValidator(_interface_address)], ...], Field(min_length=1, max_length=20)
    ]
    # Unicast VRRP to these peers (their addresses on ``interface``); empty: multicast (224.0.0.18).
    peers: tuple[Annotated[str, BeforeValidator(_ip_address)], ...] = ()
    # VRRPv3 advertisement interval. The backup takes over about 3 intervals after the last advert it
    # heard (plus a skew under one interval): 200ms -> about 0.7 s. Shorter reacts faster and is more easily
    # fooled by a loaded host or a congested link into a failover nobody wanted.
    advert_interval: Annotated[Duration, Field(ge=0.01, le=40.0)] = 0.2
    # A balancer coming back does not take the address back from one that serves well (every move of the
    # address cuts the associations in flight): nopreempt. True: the higher priority always takes it back.
    preempt: bool = False
    # How often keepalived asks pacslb whether it serves (``pacslb health``), and after how many failures
    # in a row the address leaves this host.
    check_interval: Annotated[Duration, Field(ge=1.0, le=60.0)] = 1.0
    check_fall: Annotated[int, Field(ge=1, le=10)] = 2
    # keepalived also watches pacslb's main process, so that its exit (kill -9 included) moves the address at
    # once. It hears of it through the kernel's process events, which only the host's own network namespace
    # receives: false where pacslb and keepalived run in another one (a container), leaving the health check.
    track_process: bool = True


class ClusterSpec(_Frozen):
    """More than one balancer: this one's name, the shared store, and the virtual IP (docs/high-availability.md)."""

    node: Annotated[str, BeforeValidator(_node_name)] = Field(default_factory=_default_node_name)
    store: Store = StoreLocation("memory")
    # The store's password, first line of this file (never in the YAML, which many can read).
    password_file: ReadableFile | None = None
    # redis+sentinel://: the Sentinels' own password (their requirepass), first line of this file. Absent: the
    # Sentinels are asked without one (password_file is the Redis servers' password; Sentinels do not take it).
    sentinel_password_file: ReadableFile | None = None
    # rediss://: the CA certificates (PEM) that the Redis server's certificate must chain to. Absent: the
    # system's CAs (a private CA, the usual case for Redis, needs this).
    ca_file: ReadableFile | None = None
    vrrp: VrrpSpec | None = None

    @model_validator(mode="after")
    def _password_needs_redis(self) -> ClusterSpec:
        if self.password_file is not None and self.store.kind == "memory":
            raise ValueError("password_file is for a Redis store (store: redis://...)")
        if self.sentinel_password_file is not None and self.store.kind != "sentinel":
            raise ValueError("sentinel_password_file is for a store behind Sentinels (store: redis+sentinel://...)")
        if self.ca_file is not None and self.store.kind != "rediss":
            raise ValueError("ca_file is for a Redis store over TLS (store: rediss://...)")
        return self


class Config(_Frozen):
    """The whole config file."""

    services: Annotated[dict[str, ServiceSpec], AfterValidator(_freeze), Field(min_length=1)]
    log: LogSpec = LogSpec()
    # How long SIGTERM waits for established connections to finish before closing them.
    shutdown_grace: Annotated[Duration, Field(ge=0)] = 30.0
    # Processes that relay bytes (the main one included): "auto" = one per core. See docs/performance.md.
    workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] | Literal["auto"] = "auto"
    admin: AdminSpec | None = None  # the admin API, dashboard and metrics; absent: none
    alerts: AlertsSpec | None = None  # email / webhook alerts; absent: none
    # A node failing its check in one service is taken out of every service it is in (the PACS is one
    # machine: if its DICOM port is dead, its web viewer is of no use either).
    fate_sharing: bool = False
    # After an administrator halts a node, its established connections may finish for this long; then they
    # are closed. 0s closes them at once.
    halt_grace: Annotated[Duration, Field(ge=0)] = 10.0
    # The other balancers: shared state, the virtual IP. Absent: a balancer on its own (memory store).
    cluster: ClusterSpec = ClusterSpec()

    @property
    def worker_count(self) -> int:
        """``workers`` as a number."""
        if self.workers == "auto":
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
        return self.workers


Issue = tuple[tuple[str | int, ...], str]


def semantic_issues(
    name: str, service: ServiceSpec, given: dict[str, Any], invalid: frozenset[str] = frozenset()
) -> list[Issue]:
    """Rules that relate several fields of one service. ``given`` is the raw mapping from the file;
    ``invalid`` names fields that failed validation and were replaced by defaults (``check`` for the whole
    section, ``check.interval`` for one key): rules involving them are skipped.

    Returns (location, reason) pairs; the location is relative to the config root.
    """
    here: tuple[str | int, ...] = ("services", name)
    issues: list[Issue] = []

    def bad(*fields: str) -> bool:
        return any(f in invalid or f.partition(".")[0] in invalid for f in fields)

    if bad("mode"):
        return issues  # every rule below depends on the mode
    if service.mode not in SUPPORTED_MODES:
        issues.append(
            (
                (*here, "mode"),
                f"mode '{service.mode}' is not available in this version (available: "
                f"{', '.join(sorted(SUPPORTED_MODES))})",
            )
        )
    allowed = PERSISTENCE_BY_MODE[service.mode]
    if not bad("persistence.type") and service.persistence.type not in allowed:
        issues.append(
            (
                (*here, "persistence", "type"),
                f"'{service.persistence.type}' cannot be done in mode '{service.mode}' "
                f"(possible: {', '.join(sorted(allowed))})",
            )
        )
    check_given = given.get("check") if isinstance(given.get("check"), dict) and not bad("check.type") else {}
    assert isinstance(check_given, dict)
    kind = service.check.type
    for key in sorted(set(check_given) & HTTP_CHECK_FIELDS):
        if kind != "http":
            issues.append(((*here, "check", key), f"only applies to checks of type http (this one is {kind})"))
    for key in sorted(set(check_given) & DICOM_CHECK_FIELDS):
        if kind != "dicom_echo":
            issues.append(((*here, "check", key), f"only applies to checks of type dicom_echo (this is {kind})"))
    body_without_get = service.check.expect_body is not None and service.check.method != "GET"
    if kind == "http" and body_without_get and not bad("check.type", "check.method", "check.expect_body"):
        issues.append(((*here, "check", "expect_body"), "needs method GET (a HEAD response has no body)"))
    if not bad("check.timeout", "check.interval") and service.check.timeout > service.check.interval:
        issues.append(((*here, "check", "timeout"), "must not be longer than check.interval"))
    if "dicom" in given and service.mode != "dicom":
        issues.append(((*here, "dicom"), f"only applies to mode dicom (this service is {service.mode})"))
    if "http" in given and service.mode != "http":
        issues.append(((*here, "http"), f"only applies to mode http (this service is {service.mode})"))
    limits_given = given.get("limits") if isinstance(given.get("limits"), dict) else {}
    assert isinstance(limits_given, dict)
    for key in sorted(set(limits_given) & DICOM_LIMIT_FIELDS):
        if service.mode != "dicom":
            issues.append(((*here, "limits", key), f"only applies to mode dicom (this service is {service.mode})"))
    http_given = given.get("http") if isinstance(given.get("http"), dict) else {}
    assert isinstance(http_given, dict)
    cookie_types = ("cookie", "cookie+source_ip")
    no_cookie = service.persistence.type not in cookie_types and not bad("persistence.type")
    if "cookie" in http_given and service.mode == "http" and no_cookie:
        issues.append(((*here, "http", "cookie"), "only applies with persistence type cookie or cookie+source_ip"))
    if service.dicom is not None and not bad("dicom.routes", "servers"):
        for i, route in enumerate(service.dicom.routes):
            for j, server in enumerate(route.servers):
                if server not in service.servers:
                    issues.append(((*here, "dicom", "routes", i, "servers", j), f"no server named {server!r}"))
    if service.dicom is not None and service.dicom.destination == "called_ae" and not bad("servers"):
        for name in service.servers:
            if len(name) > 16 or "\\" in name or name != name.strip():
                issues.append(((*here, "servers", name), "with dicom.destination: called_ae, a server's name is an AE "
                               "title: at most 16 characters, no backslash, no leading or trailing space"))  # fmt: skip
        if service.persistence.type != "none" and not bad("persistence.type"):
            issues.append(((*here, "persistence", "type"), "with dicom.destination: called_ae, the called AE title "
                           "chooses the server: persistence must be none"))  # fmt: skip
    if service.proxy_protocol != "none" and service.mode == "http":
        issues.append(((*here, "proxy_protocol"), "not in mode http: node connections there are shared by "
                       "clients; each request carries its client's address in X-Forwarded-For and Forwarded "
                       "(http.forward)"))  # fmt: skip
    if service.proxy_protocol != "none" and kind in ("http", "dicom_echo") and service.check.port is None:
        issues.append(((*here, "check", "port"), f"needed with proxy_protocol and a check of type {kind}: a port where "
                       "the node does not expect the PROXY header (a tcp check sends the header itself)"))  # fmt: skip
    if service.source is not None and not bad("servers", "source"):
        version = ipaddress.ip_address(service.source).version
        for server_name, node in service.servers.items():
            if (6 if ":" in node.address.host else 4) != version:
                issues.append(((*here, "source"), f"IPv{version}, and server {server_name} is not"))
    if not bad("servers") and all(s.weight == 0 for s in service.servers.values()):
        issues.append(((*here, "servers"), "every server has weight 0: the service could never pick one"))
    return issues
