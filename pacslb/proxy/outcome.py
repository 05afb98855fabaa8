"""How a client connection (tcp, dicom) or an HTTP exchange ended: the one vocabulary of the log lines
(``end=``), the same word for the same end in every mode."""

from __future__ import annotations

from enum import StrEnum


class End(StrEnum):
    OK = "ok"  # mode http: the exchange was served
    CLIENT_CLOSED = "client_closed"  # the client closed (or reset) first
    SERVER_CLOSED = "server_closed"  # the node closed (or reset) first
    CLIENT_TIMEOUT = "client_timeout"  # idle past timeouts.client_idle
    SERVER_TIMEOUT = "server_timeout"  # idle past timeouts.server_idle
    REFUSED = "refused"  # every node tried refused or did not answer the connect
    NO_SERVER = "no_server"  # no node was usable at all
    REJECTED = "rejected"  # mode dicom: the association was rejected (A-ASSOCIATE-RJ) by pacslb or a node
    ABORTED = "aborted"  # mode dicom: pacslb aborted a client that broke the protocol or stayed silent
    SHUTDOWN = "shutdown"  # closed by pacslb stopping after its grace period
    ERROR = "error"  # a bug in pacslb; logged with its traceback
    HALTED = "halted"  # closed when an administrator's halt of its node was past its grace
    NO_DESCRIPTORS = "no_descriptors"  # pacslb ran out of file descriptors (or socket memory) for it
    BAD_REQUEST = "bad_request"  # mode http: a malformed, ambiguous or refused request (answered 4xx/5xx)
    BAD_RESPONSE = "bad_response"  # mode http: a node's malformed or ambiguous response (answered 502)
