"""The control socket (shell): the server the daemon runs and the client the CLI and engines use.

See :mod:`coloproxy.control.server`, :mod:`coloproxy.control.client` and
docs/control-protocol.md.
"""

from coloproxy.control.client import ControlClient, ControlConnectionError, ControlRefusedError
from coloproxy.control.server import (
    ClientInfo,
    ControlError,
    ControlHandler,
    ControlServer,
    HandlerReply,
    PeerCredentials,
    ProxyIdentity,
    Runstate,
)

__all__ = [
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
