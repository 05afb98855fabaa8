"""mode dicom decisions from an association's facts: access control, routing, persistence keys.

Pure functions of the service's ``dicom`` settings and what the A-ASSOCIATE-RQ and the connection say
(calling AE, called AE, client address). AE titles are case-sensitive (PS3.5 6.2: AE is a string of the
default repertoire, compared as given), and globs follow shell rules: ``CT*``, ``MR0?``, ``[UC]S01``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from pacslb.balance.persistence import source_ip_key
from pacslb.config.model import DicomSpec
from pacslb.protocols.dicom import Rejection, RJReason, RJResult, RJSource

CALLING_AE_NOT_RECOGNIZED = Rejection(
    RJResult.REJECTED_PERMANENT, RJSource.SERVICE_USER, RJReason.USER_CALLING_AE_NOT_RECOGNIZED
)
CALLED_AE_NOT_RECOGNIZED = Rejection(
    RJResult.REJECTED_PERMANENT, RJSource.SERVICE_USER, RJReason.USER_CALLED_AE_NOT_RECOGNIZED
)
#: No usable node: transient, so a modality retries later instead of giving up (PS3.8 table 9-21).
NO_NODE = Rejection(
    RJResult.REJECTED_TRANSIENT,
    RJSource.SERVICE_PROVIDER_PRESENTATION,
    RJReason.PRESENTATION_TEMPORARY_CONGESTION,
)
#: The service's maxconn is reached.
AT_LIMIT = Rejection(
    RJResult.REJECTED_TRANSIENT,
    RJSource.SERVICE_PROVIDER_PRESENTATION,
    RJReason.PRESENTATION_LOCAL_LIMIT_EXCEEDED,
)


def identity_allows(bound: Mapping[str, Sequence[str]], calling: str, names: Sequence[str]) -> bool:
    """Whether a client whose certificate carries ``names`` (subject CN, DNS subjectAltNames) may call as
    ``calling``: the first AE title pattern of ``bound`` that matches it names the identities (globs) that
    may use it; a calling AE title no pattern matches is not allowed (the binding is the whole list).
    Identities compare without regard to case, as DNS names do."""
    for ae, patterns in bound.items():
        if fnmatchcase(calling, ae):
            return any(fnmatchcase(name.lower(), pattern.lower()) for name in names for pattern in patterns)
    return False


def most_informative(rejections: Sequence[Rejection]) -> int:
    """Which of the transient rejections nodes gave one association the modality gets (its index), when no
    node accepted it: the first, in the order the nodes were offered it, that gives a reason (temporary
    congestion, local limit exceeded, protocol version not supported) over any that gives none ("no reason
    given" from the service user or the ACSE); failing that, the first. ``rejections`` is not empty."""
    for index, rejection in enumerate(rejections):
        if (rejection.source, rejection.reason) not in _NO_REASON:
            return index
    return 0


_NO_REASON = {
    (RJSource.SERVICE_USER, RJReason.USER_NO_REASON),
    (RJSource.SERVICE_PROVIDER_ACSE, RJReason.ACSE_NO_REASON),
}


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def check_access(spec: DicomSpec | None, calling: str, called: str, client: str) -> Rejection | None:
    """The rejection an association gets at the edge, or None when it may pass."""
    if spec is None:
        return None
    if spec.called_ae is not None and not any(fnmatchcase(called, p) for p in spec.called_ae):
        return CALLED_AE_NOT_RECOGNIZED
    if spec.allowed_calling_ae is not None:
        ip = _ip(client)
        for rule in spec.allowed_calling_ae:
            if fnmatchcase(calling, rule.ae) and (
                rule.sources is None or any(ip in net for net in rule.sources if net.version == ip.version)
            ):
                return None
        return CALLING_AE_NOT_RECOGNIZED
    return None


def route(spec: DicomSpec | None, calling: str, called: str, client: str) -> tuple[str, ...] | None:
    """The server names of the first matching route, or None (all servers) when none matches."""
    if spec is None or not spec.routes:
        return None
    ip = _ip(client)
    for rule in spec.routes:
        if rule.calling_ae is not None and not fnmatchcase(calling, rule.calling_ae):
            continue
        if rule.called_ae is not None and not fnmatchcase(called, rule.called_ae):
            continue
        if rule.source is not None and (rule.source.version != ip.version or ip not in rule.source):
            continue
        return rule.servers
    return None


def persistence_key(kind: str, calling: str, client: str, prefix4: int = 32, prefix6: int = 128) -> str | None:
    """The persistence key of an association for a persistence ``type`` (None for ``none``)."""
    if kind == "none":
        return None
    if kind == "source_ip":
        return source_ip_key(client, prefix4, prefix6)
    if kind == "calling_ae":
        return f"ae:{calling}"
    if kind == "calling_ae+source_ip":
        return f"ae:{calling}@{source_ip_key(client, prefix4, prefix6)}"
    raise ValueError(f"persistence type {kind!r} is not available in mode dicom")
