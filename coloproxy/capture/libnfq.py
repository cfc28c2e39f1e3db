"""The ``netfilterqueue`` transport: NFQUEUE through the netfilterqueue library.

netfilterqueue (libnetfilter_queue underneath) is an optional extra (``scripts/setup
nfqueue``), kept as a fallback to our own netlink client (``netlink.py``, the default); the
interface both implement, and what holding a packet in the kernel means, is in ``queue.py``.
The measurements that chose between them are in ``bench/nfqueue_README.md``.
"""

from __future__ import annotations

import errno
import logging
import warnings
from typing import TYPE_CHECKING, Any

from coloproxy.capture.queue import QueueBase, QueueCounters, QueueError, QueueState, no_enobufs
from coloproxy.config import Transport
from coloproxy.errors import InputError, UsageError

if TYPE_CHECKING:
    from netfilterqueue import NetfilterQueue, Packet

    from coloproxy.capture.queue import OnPacket, QueueConfig

__all__ = ["NfQueue"]

log = logging.getLogger(__name__)


class _BatchFull(Exception):  # noqa: N818 -- a control-flow signal, not an error
    """Raised from the per-packet callback to leave ``NetfilterQueue.run`` early.

    ``run(block=False)`` reads until the socket is empty, which under sustained load may be
    never. An exception from the callback makes ``nfq_handle_packet`` fail and ``run``
    return it to us; the packets still unread stay in the socket for the next wake-up.
    """


class NfQueue(QueueBase):
    """One NFQUEUE through netfilterqueue (libnetfilter_queue), on the running asyncio loop.

    ``handle`` is netfilterqueue's ``Packet``. We copy the payload out with
    ``get_payload()`` inside the callback, which is all ``retain()`` would do (a second
    copy), so we do not call it; the Packet keeps its id and its queue, which is all a
    verdict needs, however late it comes.

    Limits of the library (1.1.0): it reads into a 4 KiB buffer, so the copy range is capped
    at 4016 bytes and longer packets reach us truncated without a sign; it cannot set the GSO
    flag; its receive loop silently skips ENOBUFS (which ``no_enobufs`` turns off anyway).
    """

    transport = Transport.NETFILTERQUEUE
    max_copy_range = 4016  # netfilterqueue: BufferSize 4096 - MetadataSize 80

    def __init__(self, config: QueueConfig, on_packet: OnPacket) -> None:
        if config.gso:
            raise InputError(
                f"queue {config.queue_num}: gso needs the netlink transport; netfilterqueue "
                "cannot set NFQA_CFG_F_GSO and would truncate GSO packets to 4016 bytes"
            )
        super().__init__(config, on_packet)
        self._nfq: NetfilterQueue | None = None
        self._fd = -1
        self._now = 0.0
        self._budget = config.batch
        self._received = 0
        self._wakeups = 0

    def fileno(self) -> int:
        """The netlink socket's fd (for diagnostics; do not read from it)."""
        return self._fd if self._state is QueueState.OPEN else -1

    def open(self) -> None:
        try:
            # Imported here, not at the top: netfilterqueue is an optional extra
            # (pyproject.toml), and the default transport runs without it.
            from netfilterqueue import COPY_PACKET, NetfilterQueue
        except ImportError as exc:  # say how to get it
            raise QueueError(
                f"queue {self._config.queue_num}: the netfilterqueue transport needs the"
                " netfilterqueue package, which is not installed (scripts/setup nfqueue);"
                " the default transport, netlink, needs nothing more"
            ) from exc
        loop = self._start_open()
        config = self._config
        # In another namespace, libnetfilter_queue opens (and autobinds) its socket there.
        # Not netfilterqueue's sockfd= route: that rebinds the given socket to the portid
        # autobound in *our* namespace, our pid for every queue, so a second queue of this
        # process in the same namespace fails with EADDRINUSE.
        try:
            nfq = self._in_netns(NetfilterQueue)
        except OSError as exc:
            # "Failed to bind family 2. Are you root?": nfnetlink's capability check.
            raise self._bind_error(exc.errno or errno.EPERM, exc, may_be_held=False) from exc
        try:
            caught = self._in_netns(self._bind, nfq, COPY_PACKET)
        except OSError as exc:
            # "Failed to create queue N." carries no errno; _bind_error asks /proc.
            raise self._bind_error(exc.errno, exc) from exc
        for warning in caught:
            # The receive buffer came out smaller than asked (not root?); say so, go on.
            log.warning("queue %d: %s", config.queue_num, warning.message)
        self._nfq = nfq
        self._fd = nfq.get_fd()
        no_enobufs(self._fd)
        loop.add_reader(self._fd, self._on_readable)
        self._state = QueueState.OPEN

    def _bind(self, nfq: NetfilterQueue, mode: int) -> list[warnings.WarningMessage]:
        """Create the queue in the kernel, with its settings; the warnings it gave."""
        config = self._config
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nfq.bind(
                config.queue_num,
                self._deliver,
                max_len=config.max_len,
                mode=mode,
                range=min(config.copy_range, self.max_copy_range),
                sock_len=config.rcvbuf,
            )
        return caught

    def _on_readable(self) -> None:
        nfq = self._nfq
        if nfq is None:
            return
        assert self._loop is not None
        self._now = self._loop.time()
        budget = self._budget = self._config.batch
        try:
            nfq.run(False)
        except _BatchFull:
            pass
        finally:
            delivered = budget - self._budget
            if delivered:
                self._received += delivered
                self._wakeups += 1

    def _deliver(self, packet: Packet) -> None:
        self._on_packet(packet, packet.get_payload(), self._now)
        self._budget -= 1
        if not self._budget:
            raise _BatchFull

    def accept(self, handle: Any, payload: bytes | None = None) -> None:
        try:
            if payload is not None:
                handle.set_payload(payload)
            handle.accept()
        except RuntimeError as exc:
            self._verdict_failed(handle, exc)

    def drop(self, handle: Any) -> None:
        try:
            handle.drop()
        except RuntimeError as exc:
            self._verdict_failed(handle, exc)

    def _verdict_failed(self, handle: Any, exc: RuntimeError) -> None:
        if self._state is QueueState.CLOSED:
            return  # the kernel dropped it at unbind; nothing left to decide
        raise UsageError(
            f"queue {self._config.queue_num}: verdict for packet {handle.id} refused: {exc}"
        ) from exc

    def close(self) -> None:
        if self._state is QueueState.OPEN:
            assert self._loop is not None and self._nfq is not None
            self._loop.remove_reader(self._fd)
            # nfq_destroy_queue: the kernel destroys the instance and drops what it holds.
            self._nfq.unbind()
            self._nfq = None
        self._state = QueueState.CLOSED

    def counters(self) -> QueueCounters:
        return QueueCounters(
            received=self._received,
            wakeups=self._wakeups,
            truncated=0,
            kernel_errors=0,
            verdict_sends=0,
            batch_verdicts=0,
        )
