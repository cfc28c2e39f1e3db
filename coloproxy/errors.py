"""The one error tree of coloproxy.

::

    ColoproxyError
     +-- UsageError            our own code called a core API wrongly (a bug, not bad input)
     +-- InputError            unusable input handed to the shell (file, capture, config)
          +-- CaptureError     a pcap file that cannot be read

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
