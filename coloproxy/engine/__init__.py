"""The checkpoint engine: turns the proxy's checkpoint requests into COLO checkpoints over
QMP, and fails over when the peer is lost (docs/engine.md).

- :mod:`coloproxy.engine.scheduler` (pure): when to checkpoint.
- :mod:`coloproxy.engine.heartbeat` (pure): the heartbeat between the daemons, sealed.
- :mod:`coloproxy.engine.decider` (pure): when to fail over.
- :mod:`coloproxy.engine.leader` (pure): the leader key's decisions (failover by quorum).
- :mod:`coloproxy.engine.qmp` (shell): one long-lived QMP connection per local QEMU.
- :mod:`coloproxy.engine.peer` (shell): the UDP heartbeat between the two daemons.
- :mod:`coloproxy.engine.colo` (shell): the QMP sequences of COLO (bring-up, failover).
- :mod:`coloproxy.engine.leadership` (shell): the leader key in the quorum service.
- :mod:`coloproxy.engine.proxy_link` (shell): the control connection to the engine's own proxy.
- :mod:`coloproxy.engine.lane` (shell): a serial worker.
- :mod:`coloproxy.engine.settings` (shell): what the engine needs from the config.
- :mod:`coloproxy.engine.runner` (shell): the engine task a daemon runs.
"""
