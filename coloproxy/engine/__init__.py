"""The checkpoint engine: turns the proxy's checkpoint requests into COLO checkpoints over
QMP, and fails over when the peer is lost (docs/engine.md).

- :mod:`coloproxy.engine.logic` (pure): the checkpoint scheduler and the failover decider.
- :mod:`coloproxy.engine.qmp` (shell): one long-lived QMP connection per local QEMU.
- :mod:`coloproxy.engine.peer` (shell): the UDP heartbeat between the two daemons.
- :mod:`coloproxy.engine.runner` (shell): the engine task a daemon runs.
"""
