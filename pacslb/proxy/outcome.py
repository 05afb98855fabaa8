"""How a client connection ended: the vocabulary of the connection log."""

from __future__ import annotations

from enum import StrEnum


class End(StrEnum):
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
