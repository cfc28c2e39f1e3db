"""The control socket (shell): the server the daemon runs and the client the CLI and engines use.

See :mod:`coloproxy.control.server` (connections), :mod:`coloproxy.control.access` (who may
be what), :mod:`coloproxy.control.socket_file` (the file), :mod:`coloproxy.control.client`,
:mod:`coloproxy.control.errors` and docs/control-protocol.md.
"""

from coloproxy.control.access import AccessPolicy, PeerCredentials
from coloproxy.control.client import ControlClient
from coloproxy.control.errors import ControlConnectionError, ControlError, ControlRefusedError
from coloproxy.control.server import (
    ClientInfo,
    ControlHandler,
    ControlServer,
    HandlerReply,
    ProxyIdentity,
    Runstate,
)

__all__ = [
    "AccessPolicy",
    "ClientInfo",
    "ControlClient",
    "ControlConnectionError",
    "ControlError",
    "ControlHandler",
    "ControlRefusedError",
    "ControlServer",
    "HandlerReply",
    "PeerCredentials",
    "ProxyIdentity",
    "Runstate",
]
