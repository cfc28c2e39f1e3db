"""The one error tree of coloproxy.

::

    ColoproxyError
     +-- UsageError               our own code called a core API wrongly (a bug, not bad input)
     +-- InputError               unusable input handed to the shell (file, capture, config)
     |    +-- CaptureError        a pcap file that cannot be read
     |    +-- ConfigError         a config file that breaks the schema (coloproxy.config)
     +-- QueueError               an NFQUEUE cannot be bound or used (coloproxy.capture.queue)
     +-- ChardevError             a chardev socket cannot listen (coloproxy.capture.chardev_link)
     +-- NetError                 links, tc or rules cannot be set up (coloproxy.net)
     +-- ControlError             the control socket (coloproxy.control.server)
     |    +-- ControlConnectionError   cannot reach a proxy (coloproxy.control.client)
     |    +-- ControlRefusedError      the proxy answered with an error reply
     +-- MetricsError             the metrics endpoint cannot listen (coloproxy.metrics)
     +-- LabNotBuiltError         the lab's QEMU or guest image is not built (coloproxy.lab.qemu)

Each lives next to the shell code that raises it (so a pure module never imports a shell
one); this drawing is the one place that shows them together.

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
