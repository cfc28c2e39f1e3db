"""``coloproxy run --record DIR``: write what the comparator is fed to pcap files.

Two classic pcap files of raw IP (link type 101), ``primary.pcap`` and ``secondary.pcap``,
exactly as the queues delivered the packets (GSO packets whole), so that
``coloproxy compare-pcap DIR/primary.pcap DIR/secondary.pcap`` replays a live session through
the same comparator. Meant for debugging: every packet costs a write. Bounded by
``max_bytes`` per file; past it recording stops and says so once.
"""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path
from typing import BinaryIO, Final

log = logging.getLogger(__name__)

LINKTYPE_RAW: Final = 101
_HEADER: Final = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW)
_RECORD: Final = struct.Struct("<IIII")


class Recorder:
    def __init__(self, directory: Path, max_bytes: int = 1 << 30) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._files: dict[str, BinaryIO] = {}
        self._sizes: dict[str, int] = {}
        for side in ("primary", "secondary"):
            handle = open(directory / f"{side}.pcap", "wb")  # noqa: SIM115  (closed in close())
            handle.write(_HEADER)
            self._files[side] = handle
            self._sizes[side] = len(_HEADER)
        log.warning("recording every compared packet to %s (a debugging aid)", directory)

    def write(self, side: str, payload: bytes) -> None:
        size = self._sizes[side]
        if size > self.max_bytes:
            return
        now = time.time()
        seconds = int(now)
        handle = self._files[side]
        handle.write(_RECORD.pack(seconds, int((now - seconds) * 1e6), len(payload), len(payload)))
        handle.write(payload)
        size += _RECORD.size + len(payload)
        self._sizes[side] = size
        if size > self.max_bytes:
            log.warning("recording of %s stopped at %d bytes", side, size)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
