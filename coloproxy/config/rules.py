"""The value rules of the configuration: a YAML value in, a typed value out, or a
:class:`BadValueError` saying what is allowed ("expected ..., got ...") (shell).

A rule sees one plain value (a list or a mapping as an empty stand-in, so that it can say
"got a list"); coloproxy.config.schema pairs each key with its rule.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import re
import typing
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Final

from coloproxy.config.problems import shown

MAX_SOCKET_PATH: Final = 107  # sun_path holds 108 bytes with the terminating NUL
MAX_SECONDS: Final = 86400.0  # no timeout of the comparator is sensibly longer than a day
MAX_COUNT: Final = 2**40  # bounds: 1 Ti packets or bytes is beyond any host


class BadValueError(Exception):
    """A value that breaks its rule; the message is "expected ..., got ..."."""


Rule = Callable[[object], object]


def bad(allowed: str, value: object) -> BadValueError:
    return BadValueError(f"expected {allowed}, got {shown(value)}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int, allowed: str | None = None) -> Rule:
    allowed = allowed or f"an integer from {low} to {high}"

    def rule(value: object) -> object:
        if not is_int(value) or not low <= value <= high:  # type: ignore[operator]
            raise bad(allowed, value)
        return value

    return rule


def seconds(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad("a positive number of seconds", value)
    if not (math.isfinite(value) and value > 0):
        raise bad("a positive number of seconds", value)
    if value > MAX_SECONDS:
        raise bad(f"a positive number of seconds, at most {MAX_SECONDS:g}", value)
    return float(value)


def boolean(value: object) -> object:
    if not isinstance(value, bool):
        raise bad("true or false", value)
    return value


def optional(rule: Rule) -> Rule:
    def optional(value: object) -> object:
        return None if value is None else rule(value)

    return optional


def choice(kind: type[StrEnum], only: Sequence[StrEnum] | None = None) -> Rule:
    members = list(kind) if only is None else list(only)
    allowed = "one of " + ", ".join(member.value for member in members)
    values = {member.value for member in members}

    def rule(value: object) -> object:
        if isinstance(value, str) and value in values:
            return kind(value)
        raise bad(allowed, value)

    return rule


def pattern(regex: str, allowed: str) -> Rule:
    compiled = re.compile(regex)

    def rule(value: object) -> object:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise bad(allowed, value)
        return value

    return rule


def interface(value: object) -> object:
    # Linux dev_valid_name(): 1-15 bytes, not "." or "..", no '/', ':' or white space.
    if (
        not isinstance(value, str)
        or not 1 <= len(value.encode()) <= 15
        or value in (".", "..")
        or any(c in value for c in "/:")
        or any(c.isspace() for c in value)
    ):
        raise bad("an interface name (1 to 15 characters, no '/', ':' or spaces)", value)
    return value


def address(value: object) -> object:
    try:
        if not isinstance(value, str):
            raise ValueError
        return ipaddress.ip_address(value)
    except ValueError:
        raise bad("an IPv4 or IPv6 address", value) from None


def socket_path(value: object) -> object:
    if not isinstance(value, str) or not value.startswith("/"):
        raise bad("an absolute path", value)
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        raise bad(f"a path of at most {MAX_SOCKET_PATH} bytes (a Unix socket address)", value)
    return Path(value)


def absolute_path(value: object) -> object:
    if not isinstance(value, str) or not value.startswith("/"):
        raise bad("an absolute path", value)
    return value


def group(value: object) -> object:
    if not isinstance(value, str) or not value:
        raise bad("a group name", value)
    try:
        grp.getgrnam(value)
    except KeyError:
        raise BadValueError(f"group {value!r} does not exist on this host") from None
    return value


_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_LISTEN: Final = "HOST:PORT (an address or host name, IPv6 in brackets; port 0 to 65535)"


def listen(value: object) -> object:
    """ "host:port" -> (host, port); "[v6]:port" for IPv6."""
    if not isinstance(value, str):
        raise bad(_LISTEN, value)
    if value.startswith("["):
        host, bracket, port = value[1:].partition("]:")
        valid_host = bool(bracket)
        if valid_host:
            try:
                valid_host = ipaddress.ip_address(host).version == 6
            except ValueError:
                valid_host = False
    else:
        host, colon, port = value.rpartition(":")
        if ":" in host:
            raise BadValueError(
                f"expected IPv6 addresses in brackets, e.g. '[::1]:9477', got {value!r}"
            )
        valid_host = bool(colon) and bool(_HOSTNAME.fullmatch(host))
    if not valid_host or not port.isdigit() or int(port) > 65535:
        raise bad(_LISTEN, value)
    return (host, int(port))


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def passthrough_protocol(value: object) -> object:
    if isinstance(value, str):
        if value in ("tcp", "udp", "icmp", "icmpv6"):
            return value
        match = re.fullmatch(r"ip-proto-(\d{1,3})", value)
        if match and int(match.group(1)) <= 255:
            return value
    raise bad("one of tcp, udp, icmp, icmpv6 or ip-proto-N (N from 0 to 255)", value)


def network(value: object) -> object:
    try:
        if not isinstance(value, str):
            raise ValueError
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise bad("a network in CIDR notation, e.g. 10.0.0.0/24", value) from None
    return value


def tcp_address(value: object) -> object:
    """ "host:port" -> (host, port), port 1 to 65535 (QEMU's chardev needs a real port)."""
    allowed = "HOST:PORT (an address or host name, IPv6 in brackets; port 1 to 65535)"
    try:
        host, port = typing.cast(tuple[str, int], listen(value))
    except BadValueError:
        raise bad(allowed, value) from None
    if port == 0:
        raise bad(allowed, value)
    return (host, port)
