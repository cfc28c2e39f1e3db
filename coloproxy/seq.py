"""TCP sequence-number arithmetic modulo 2**32 (RFC 1982 serial-number style).

Every comparison of raw sequence or acknowledgement numbers in coloproxy goes through this
module; raw integers are never compared with ``<`` directly. ``diff(a, b)`` is the signed
distance from ``b`` to ``a`` in the range [-2**31, 2**31), which is meaningful as long as the
two numbers are less than 2**31 apart (RFC 1982 section 3.2).
"""

from typing import Final

MOD: Final = 1 << 32
_HALF: Final = 1 << 31
_MASK: Final = MOD - 1


def add(seq: int, delta: int) -> int:
    """``seq + delta`` wrapped into [0, 2**32)."""
    return (seq + delta) & _MASK


def diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` modulo 2**32, in [-2**31, 2**31)."""
    return ((a - b + _HALF) & _MASK) - _HALF


def lt(a: int, b: int) -> bool:
    """``a`` comes before ``b``."""
    return diff(a, b) < 0


def leq(a: int, b: int) -> bool:
    """``a`` comes before ``b`` or equals it."""
    return diff(a, b) <= 0


def gt(a: int, b: int) -> bool:
    """``a`` comes after ``b``."""
    return diff(a, b) > 0


def geq(a: int, b: int) -> bool:
    """``a`` comes after ``b`` or equals it."""
    return diff(a, b) >= 0


def later(a: int, b: int) -> int:
    """The later of two sequence numbers."""
    return a if diff(a, b) >= 0 else b
