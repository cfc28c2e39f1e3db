"""The rules of the control protocol's conversation (pure): which version two sides speak,
what each client role may send, which kinds also need engine credentials, and who receives
each push. The server (:mod:`coloproxy.control.server`) enforces them; docs/control-protocol.md,
"Who may send what".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from coloproxy.protocol.messages import SUPPORTED_VERSIONS, ClientRole

# What each client role may send (besides hello). Everything else is refused with
# "forbidden"; kinds only the proxy sends are refused with "unexpected".
CLIENT_MAY_SEND: Final[Mapping[ClientRole, frozenset[str]]] = {
    ClientRole.ENGINE: frozenset(
        {"checkpoint-started", "checkpoint-completed", "status-request", "failover", "attach-lan"}
    ),
    ClientRole.CLI: frozenset(
        {"status-request", "checkpoint", "set-period", "failover", "attach-lan", "reprotect"}
    ),
    ClientRole.MONITOR: frozenset({"status-request"}),
}
# Kinds that lift protection or change what the engine does: besides a role that may send
# them, the peer needs engine credentials (root, the proxy's own user, control.engine_group),
# whatever role it claimed. A peer with engine credentials may claim any role; see
# docs/control-protocol.md, "Who may send what".
NEEDS_ENGINE_CREDENTIALS: Final = frozenset(
    {
        "checkpoint-started",
        "checkpoint-completed",
        "set-period",
        "failover",
        "attach-lan",
        "reprotect",
    }
)
# Who receives each kind of push.
PUSH_TO: Final[Mapping[str, frozenset[ClientRole]]] = {
    "checkpoint-request": frozenset({ClientRole.ENGINE}),
    "set-period": frozenset({ClientRole.ENGINE}),
}


def choose_version(offered: Iterable[int]) -> int | None:
    """The highest version both sides speak, or None."""
    common = SUPPORTED_VERSIONS.intersection(offered)
    return max(common) if common else None
