"""What goes wrong on the control socket: the exceptions the server and the client raise."""

from __future__ import annotations

from coloproxy.errors import ColoproxyError
from coloproxy.protocol import ErrorReply


class ControlError(ColoproxyError):
    """The control socket cannot be served or used (path, group, connection, refusal)."""


class ControlConnectionError(ControlError):
    """The control socket cannot be reached, or the connection broke."""


class ControlRefusedError(ControlError):
    """The proxy answered with an ``error``; ``reply`` is that message."""

    def __init__(self, reply: ErrorReply, what: str) -> None:
        super().__init__(f"{what}: refused ({reply.code}): {reply.message}")
        self.reply = reply
