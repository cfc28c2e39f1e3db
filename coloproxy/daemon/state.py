"""What one daemon runs now, in which role and mode (shell).

The daemon (``coloproxy/daemon/run.py``) builds the parts and replaces them at a reprotect;
its control handler (``coloproxy/daemon/control.py``) reads them to answer and changes the
mode at a failover; the takeover (``coloproxy/daemon/takeover.py``) reads host S's proxy. One
object, so that each sees what the others changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from coloproxy.capture.chardev import ChardevTransport
from coloproxy.compare import Comparator
from coloproxy.config import Config
from coloproxy.daemon.primary import PrimaryProxy
from coloproxy.daemon.secondary import SecondaryProxy
from coloproxy.engine.runner import EngineRunner
from coloproxy.protocol import Mode
from coloproxy.role import Role


@dataclass
class DaemonState:
    # The config in force: the file's, with a reload's live changes, and a reprotect's role.
    config: Config
    role: Role
    mode: Mode = Mode.PROTECTED
    period_ms: int | None = None  # the engines' checkpoint period, when known
    proxy: PrimaryProxy | None = None  # host P: the comparator's pump
    comparator: Comparator | None = None
    secondary: SecondaryProxy | None = None  # host S: the SVM's sequence spaces
    chardev: ChardevTransport | None = None  # the chardev transport, when configured
    engine: EngineRunner | None = None  # engine.qmp set: the checkpoint engine
    reprotecting: bool = False

    def summary(self) -> str:
        """One line for systemctl status: pair, role, mode."""
        return f"pair {self.config.pair.name}: {self.role.value}, {self.mode.value}"
