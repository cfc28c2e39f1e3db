"""The one error tree of coloproxy.

::

    ColoproxyError                     errors             root of all raised on purpose
     +-- UsageError                    errors             a core API called wrongly (a bug)
     +-- InputError                    errors             unusable input handed to the shell
     |    +-- CaptureError             errors             a pcap file that cannot be read
     |    +-- ConfigError              config.problems    a config file that breaks the schema
     +-- QueueError                    capture.queue      an NFQUEUE cannot be bound or used
     +-- ChardevError                  capture.chardev_link  a chardev socket cannot listen
     +-- NetError                      net                links, tc or rules cannot be set up
     +-- ControlError                  control.errors     the control socket
     |    +-- ControlConnectionError   control.errors     cannot reach a proxy
     |    +-- ControlRefusedError      control.errors     the proxy answered with an error reply
     +-- MetricsError                  metrics.server     the metrics endpoint cannot listen
     +-- EngineError                   engine.qmp         the checkpoint engine cannot do its work
     |    +-- QmpError                 engine.qmp         a QMP command failed, or no monitor
     |    |    +-- QemuGoneError       engine.qmp         the monitor closed: QEMU exited
     |    |    +-- DiskError           engine.disk        a block replication step failed
     |    +-- PeerError                engine.peer        a heartbeat socket cannot be opened
     +-- QuorumError                   engine.quorum      the quorum service did not answer, refused
     +-- LabError                      lab.vms            something the lab started failed, in time
     +-- LabNotBuiltError              lab.qemu           the lab's QEMU or guest image is not built
     +-- EtcdError                     lab.etcd           the lab's etcd cluster did not come up
     +-- PartitionError                lab.partition      a lab partition cannot be made or healed

Each lives next to the shell code that raises it (so a pure module never imports a shell
one): the middle column is its module under ``coloproxy.``; this drawing is the one place
that shows them together. ``tests/test_errors.py`` checks it against the code: every
exception class in coloproxy/ is drawn here, under its real base, in its real module.

Internal signals: plain ``Exception``, caught inside their package, never seen by a user::

    BadValueError                      config.rules       a value breaks its key's rule
    _LimitError                        config.reader      the file passes a bound of the reader
    _BatchFull                         capture.libnfq     leave NetfilterQueue.run early
    _InvalidError                      protocol.codec     a field does not fit (a ProtocolError)

Bad *packets* never raise: the packet layer returns ``Malformed`` and the comparator turns it
into an event (invariant I5). Exceptions are for misuse and for unusable files.
"""


class ColoproxyError(Exception):
    """Root of every exception coloproxy raises on purpose."""


class UsageError(ColoproxyError):
    """A core API was called in a way its contract forbids (a bug in the caller)."""


class InputError(ColoproxyError):
    """Input the shell was given cannot be used; the message says what and where."""


class CaptureError(InputError):
    """A capture file cannot be read (bad magic, unsupported link type, truncated header)."""
