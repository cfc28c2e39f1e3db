"""recvmmsg(2) through ctypes, and the receive slots it fills (the netlink transport's reader).

Python's socket module has no recvmmsg(); libc's is called through ctypes. Kept out of
``netlink.py``, which is compiled (coloproxy/variant.py): mypyc cannot compile ctypes
structures (their metaclass), and a call into ctypes costs the same from either.
``libc_recvmmsg`` is looked up on this module at every wake-up, so that a test (or a bench's
accounting) may wrap it.
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["MSG_DONTWAIT", "Slots", "libc_recvmmsg"]

MSG_DONTWAIT = 0x40  # bits/socket_type.h


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


_recvmmsg_fn: Any = None


def libc_recvmmsg() -> Any:
    """libc's recvmmsg(2), looked up once: ``(fd, headers, count, flags, None) -> int``."""
    global _recvmmsg_fn
    if _recvmmsg_fn is None:
        function = ctypes.CDLL(None, use_errno=True).recvmmsg
        function.argtypes = (
            ctypes.c_int,
            ctypes.POINTER(_Mmsghdr),
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_void_p,
        )
        function.restype = ctypes.c_int
        _recvmmsg_fn = function
    return _recvmmsg_fn


class Slots:
    """Receive slots for recvmmsg(): one buffer cut into ``count`` slots of ``size`` bytes."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.buffer = (ctypes.c_char * (count * size))()
        self.view = memoryview(self.buffer).cast("B")
        self.iovecs = (_Iovec * count)()
        self.headers = (_Mmsghdr * count)()
        base = ctypes.addressof(self.buffer)
        for index in range(count):
            self.iovecs[index].iov_base = base + index * size
            self.iovecs[index].iov_len = size
            self.headers[index].msg_hdr.msg_iov = ctypes.pointer(self.iovecs[index])
            self.headers[index].msg_hdr.msg_iovlen = 1
