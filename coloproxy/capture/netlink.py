"""NFQUEUE over a raw netlink socket, in Python: the ``netlink`` transport.

Theory of operation
-------------------
NFQUEUE is a small nfnetlink protocol (net/netfilter/nfnetlink_queue.c; its messages are
built and read in ``netlink_codec.py``). We open an AF_NETLINK/NETLINK_NETFILTER socket and,
in one NFQNL_MSG_CONFIG message, bind the queue (NFQA_CFG_CMD), ask for whole packets
(NFQA_CFG_PARAMS), set the queue length (NFQA_CFG_QUEUE_MAXLEN) and the flags
(NFQA_CFG_FLAGS under NFQA_CFG_MASK): GSO if configured, FAIL_OPEN explicitly cleared. The
kernel then sends one NFQNL_MSG_PACKET per queued packet, each in a datagram of its own,
with the packet id in NFQA_PACKET_HDR (always the first attribute) and the packet in
NFQA_PAYLOAD (always the last).

What this buys over netfilterqueue, measured in ``bench/nfqueue_bench.py``:

* **GSO.** With NFQA_CFG_F_GSO the kernel queues a GSO packet (up to 64 KiB) whole instead
  of segmenting it into MTU-sized packets first, one message and one verdict for up to ~44
  segments. Such packets may carry partial checksums (NFQA_SKB_CSUMNOTREADY): fine for
  accept and drop, not for a payload rewrite (the kernel marks a rewritten packet
  CHECKSUM_NONE and sends the partial checksum as it is), so S-in keeps GSO off.
* **Fewer verdict syscalls.** Verdicts given during a wake-up (of this queue or of another
  member of its ``WakeGroup``; outside any, in one loop iteration after) go out in one
  ``send()``, except those of its first two packets, which go at
  once for latency (see ``_EAGER_VERDICTS``): nfnetlink processes every message of a
  datagram in turn. When they form a run of one kind in ascending id order and no other delivered
  packet is still undecided, the run becomes one NFQNL_MSG_VERDICT_BATCH, which decides
  every queued id up to the last -- hence the "nothing else undecided" rule, which keeps a
  batch from releasing a held packet.
* **Overruns do not stop the reader.** A full receive buffer makes the kernel drop packets
  (counted in its ``user_dropped``, /proc/net/netfilter/nfnetlink_queue). Without
  ``NETLINK_NO_ENOBUFS`` it would also set a socket error, which epoll reports as EPOLLERR,
  and libuv (uvloop) answers EPOLLERR by closing the fd's poll handle: the queue was never
  read again and dropped everything after its first overrun. So the option is set on every
  queue socket (``no_enobufs``). Error replies to verdicts are counted.

The handle given to ``on_packet`` is the packet id (an int). The set of ids delivered and
not yet decided is what makes a batch verdict safe and a double verdict an error.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeVar

from coloproxy.capture import recvmmsg
from coloproxy.capture.netlink_codec import (
    BE32,
    HEADER_LEN,
    NF_ACCEPT,
    NF_DROP,
    NF_QUEUE,
    NFQA_CAP_LEN,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQNL_CFG_CMD_BIND,
    NFQNL_CFG_CMD_UNBIND,
    NFQNL_MSG_CONFIG,
    NLATTR,
    NLMSG_ERROR,
    NLMSG_LEN_TYPE,
    NLMSGHDR,
    TYPE_PACKET,
    VerdictCodec,
    build_config,
    build_verdict,
    iter_messages,
    parse_error,
    parse_packet,
)
from coloproxy.capture.queue import (
    OnPacket,
    QueueBase,
    QueueConfig,
    QueueCounters,
    QueueError,
    QueueState,
    no_enobufs,
)
from coloproxy.config import Transport
from coloproxy.errors import UsageError

__all__ = ["NetlinkQueue"]

log = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseException)

# linux/netlink.h
NETLINK_NETFILTER: Final = 12
# asm-generic/socket.h: like SO_RCVBUF but may exceed net.core.rmem_max (needs CAP_NET_ADMIN)
SO_RCVBUFFORCE: Final = 33

# Largest datagram: a 64 KiB GSO packet (payload capped at 65531 by NFQNL_MAX_COPY_RANGE)
# plus its metadata attributes (under 200 bytes with the flags we set; 4 KiB of room).
_RECV_SIZE: Final = 0x10000 + 4096
# Datagrams one recvmmsg() call may return. Each has a slot of _RECV_SIZE bytes, so a queue
# holds 32 * 68 KiB = 2.2 MiB of receive slots. One call instead of one recv() per packet
# measured +10-20% bulk throughput (see bench/nfqueue_README.md).
_SLOTS: Final = 32


# Verdicts given to the first two packets of a wake-up are sent before we read on; the rest
# wait for the end of the wake-up and go out together. A request/response flow sees one or
# two packets per wake-up, and a verdict's send() runs the forwarding path in our context,
# where the receiver's immediate ACK is queued back to us at once: sent first, that ACK is
# read in the same wake-up instead of costing another trip through the loop. Measured with
# bench/nfqueue_bench.py's latency client, 6 interleaved rounds: p50 147 us when every
# verdict waits for the end of the wake-up, 144 us sending the first at once, 126 us the
# first two (netfilterqueue, which sends each verdict at once: 130 us). Bulk wake-ups carry
# a couple of hundred packets, so sending two of them alone costs nothing measurable.
# Only accepts can bring such an answer: after a receive that found the socket empty, a
# wake-up whose verdicts are drops (or none yet) stops reading instead of asking the empty
# socket again (a syscall per packet in the lab's one-packet wake-ups); what arrives later
# wakes the loop again (tests/test_capture_nfqueue.py, "drained").
_EAGER_VERDICTS: Final = 2
# Bytes of verdicts per send(): netlink refuses a datagram larger than the socket's send
# buffer (EMSGSIZE; default 208 KiB). 4096 plain verdicts of 32 bytes, or one rewritten
# packet of up to 64 KiB with a few others.
_MAX_SEND: Final = 128 << 10

# ---------------------------------------------------------------------------------------------
# The transport.


def _caused(error: E, cause: BaseException) -> E:
    """``error`` with ``cause`` as its ``__cause__``. mypyc (this module is compiled) raises
    ``raise error from cause`` without the ``from``: ``raise _caused(error, cause) from cause``
    chains in both variants."""
    error.__cause__ = cause
    return error


def _ascending(ids: list[int]) -> bool:
    if len(ids) < 3:  # the common case at one or two packets per wake-up: no generator
        return len(ids) < 2 or ids[0] < ids[1]
    return all(earlier < later for earlier, later in itertools.pairwise(ids))


class WakeGroup:
    """Queues whose verdicts go out together at the end of any member's wake-up.

    A packet read on one queue may decide packets of another (host P: the secondary's copy on
    S-out releases the primary's on P-out). Alone, such a verdict waits for a loop callback
    of its own (``call_soon``) after the wake-up; in a group, the reader that is running
    sends every member's verdicts when it ends, and ``after_wakeup`` (set by the consumer:
    the daemon re-arms its timer pump there) runs once per wake-up instead of once per
    packet. Verdicts given outside any wake-up are scheduled as before.
    """

    __slots__ = ("active", "after_wakeup", "members")

    def __init__(self, after_wakeup: Callable[[], None] | None = None) -> None:
        self.active = False  # a member's reader (or bind handshake) is running
        self.after_wakeup = after_wakeup
        self.members: list[NetlinkQueue] = []

    def flush(self) -> None:
        """Send every member's pending verdicts."""
        for queue in self.members:
            if queue._run or queue._out:
                queue._flush()


class NetlinkQueue(QueueBase):
    """One NFQUEUE over a raw netlink socket, on the running asyncio loop.

    The interface of ``queue.py``; ``handle`` is the packet id (an int). Verdicts are queued
    and sent at the end of the current wake-up (the first two packets' at once), or in the
    next loop iteration if given outside one, so that a burst of releases goes out in one
    send; ``flush()`` sends at once.
    """

    transport: ClassVar[Transport] = Transport.NETLINK

    def __init__(
        self, config: QueueConfig, on_packet: OnPacket, group: WakeGroup | None = None
    ) -> None:
        super().__init__(config, on_packet)
        self._group = group if group is not None else WakeGroup()
        self._group.members.append(self)
        self._sock: socket.socket | None = None
        self._buf = bytearray(_RECV_SIZE)  # for the bind handshake
        self._view = memoryview(self._buf)
        self._slots: recvmmsg.Slots | None = None
        self._undecided: set[int] = set()
        # The run of plain verdicts of one kind (self._run_verdict) not yet encoded, and the
        # encoded verdicts before it, in the order the consumer gave them.
        self._run: list[int] = []
        self._run_verdict = NF_ACCEPT
        self._out = bytearray()
        self._flush_scheduled = False
        self._seq = 0
        self._acks: dict[int, int] = {}
        self._codec = VerdictCodec(config.queue_num)
        self._prefix = self._codec.plain
        self._batch_prefix = self._codec.batch
        self._received = 0
        self._wakeups = 0
        self._truncated = 0
        self._kernel_errors = 0
        self._verdict_sends = 0
        self._batch_verdicts = 0

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    # -- binding ---------------------------------------------------------------------------

    def open(self) -> None:
        loop = self._start_open()
        config = self._config
        # Created in the queue's namespace, the socket stays in it (see queue.py).
        sock = self._in_netns(socket.socket, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))  # the kernel picks our portid
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, config.rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, config.rcvbuf)
            no_enobufs(sock.fileno())
            self._sock = sock
            flags = NFQA_CFG_F_GSO if config.gso else 0
            self._request(
                build_config(
                    config.queue_num,
                    command=NFQNL_CFG_CMD_BIND,
                    copy_range=config.copy_range,
                    max_len=config.max_len,
                    flags=flags,
                    # Fail closed: clear FAIL_OPEN explicitly, whatever the default.
                    mask=NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN,
                    seq=self._next_seq(),
                )
            )
        except OSError as exc:
            self._sock = None
            sock.close()
            raise _caused(self._bind_error(exc.errno, exc), exc) from exc
        except BaseException:
            self._sock = None
            sock.close()
            raise
        sock.setblocking(False)
        self._slots = recvmmsg.Slots(min(_SLOTS, config.batch), _RECV_SIZE)
        loop.add_reader(sock.fileno(), self._on_readable)
        self._state = QueueState.OPEN
        if self._run or self._out:
            self._flush()  # verdicts given to packets that came with the bind's ack

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _request(self, message: bytes, timeout: float = 2.0) -> None:
        """Send a request and wait for its ack; raise OSError with the kernel's errno.

        Packets may arrive before the ack (the queue exists as soon as the bind is done):
        they are delivered as usual, with the clock read when they arrive.
        """
        assert self._sock is not None and self._loop is not None
        sock = self._sock
        seq = NLMSGHDR.unpack_from(message, 0)[3]
        sock.settimeout(timeout)
        sock.send(message)
        group = self._group
        was_active, group.active = group.active, True
        try:
            while seq not in self._acks:
                try:
                    size = sock.recv_into(self._buf)
                except TimeoutError as exc:
                    timeout_error = OSError(errno.ETIMEDOUT, "no answer from nfnetlink_queue")
                    raise _caused(timeout_error, exc) from exc
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:  # not with NETLINK_NO_ENOBUFS; harmless
                        continue
                    raise
                self._dispatch_slow(self._view[:size], self._loop.time())
        finally:
            group.active = was_active
        error = self._acks.pop(seq)
        if error:
            raise OSError(error, errno.errorcode.get(error, str(error)))

    def _dispatch_slow(self, data: memoryview, now: float) -> None:
        """Every message of one datagram, decoded in full (bind time and control messages)."""
        for msg_type, _flags, _seq, start, _end in iter_messages(data):
            if msg_type == TYPE_PACKET:
                packet = parse_packet(data, start)
                if packet.cap_len is not None:
                    self._truncated += 1
                self._undecided.add(packet.packet_id)
                self._received += 1
                self._on_packet(packet.packet_id, packet.payload, now)
            elif msg_type == NLMSG_ERROR:
                self._control_error(data, start)

    def _control_error(self, data: memoryview, start: int) -> None:
        error, echoed_type, echoed_seq = parse_error(data, start)
        if echoed_seq and echoed_type & 0xFF == NFQNL_MSG_CONFIG:
            self._acks[echoed_seq] = error
            return
        if error:
            # Verdicts are sent without NLM_F_ACK, so only failures come back: an id the
            # kernel no longer holds (dropped by a device going down), or a bad message.
            self._kernel_errors += 1
            log.warning(
                "queue %d: kernel refused a message of type %#x: %s",
                self._config.queue_num,
                echoed_type,
                errno.errorcode.get(error, str(error)),
            )

    # -- receiving -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        slots = self._slots
        if sock is None or slots is None:
            return
        assert self._loop is not None
        now = self._loop.time()
        receive = recvmmsg.libc_recvmmsg()
        fd = sock.fileno()
        headers = slots.headers
        view = slots.view
        slot_size = slots.size
        unpack_header = NLMSG_LEN_TYPE.unpack_from
        unpack_attr = NLATTR.unpack_from
        unpack_be32 = BE32.unpack_from
        on_packet = self._on_packet
        undecided_add = self._undecided.add
        batch = self._config.batch
        run = self._run
        out = self._out
        replies_here = self._config.replies_here
        group = self._group
        delivered = 0
        drained = False  # the last receive returned fewer packets than it asked for
        group.active = True
        try:
            while delivered < batch:
                if 0 < delivered <= _EAGER_VERDICTS and (run or out):
                    # Accepts sent now may bring an answer to this socket at once (see
                    # _EAGER_VERDICTS): read again for it. Drops bring nothing back, nor
                    # does anything on a queue whose packets go where no answer comes
                    # back to it (QueueConfig.replies_here).
                    answerable = replies_here and (bool(out) or self._run_verdict != NF_DROP)
                    self._flush()
                    if drained and not answerable:
                        break
                elif drained:
                    # The socket was empty after the last packet: reading again would be a
                    # syscall per wake-up for nothing. What arrives since wakes the loop.
                    break
                asked = min(slots.count, batch - delivered)
                count = receive(fd, headers, asked, recvmmsg.MSG_DONTWAIT, None)
                drained = count < asked
                if count < 0:
                    err = ctypes.get_errno()
                    if err == errno.EAGAIN:
                        break
                    if err == errno.ENOBUFS:  # not with NETLINK_NO_ENOBUFS; harmless
                        continue
                    raise QueueError(
                        f"queue {self._config.queue_num}: receive failed: {os.strerror(err)}",
                        self._config.queue_num,
                    )
                for base in range(0, count * slot_size, slot_size):
                    size, msg_type = unpack_header(view, base)
                    if size > slot_size:  # cut by the slot (cannot happen: see _RECV_SIZE)
                        self._truncated += 1
                        size = slot_size
                    if msg_type != TYPE_PACKET:  # an error reply: the slow path
                        self._dispatch_slow(view[base : base + size], now)
                        continue
                    # One packet per datagram (nfnetlink_unicast sends each in its own skb).
                    # Walk the attributes: the header first, the payload last, a few between.
                    end = base + size
                    offset = base + HEADER_LEN
                    packet_id = -1
                    payload = b""
                    while offset < end:
                        attr_len, attr_type = unpack_attr(view, offset)
                        if attr_type == NFQA_PACKET_HDR:
                            packet_id = unpack_be32(view, offset + 4)[0]
                        elif attr_type == NFQA_PAYLOAD:
                            payload = bytes(view[offset + 4 : min(offset + attr_len, end)])
                        elif attr_type == NFQA_CAP_LEN:
                            self._truncated += 1
                        # "or 4": a zero length (never sent by the kernel) must not loop forever.
                        offset += (attr_len + 3) & ~3 or 4
                    undecided_add(packet_id)
                    delivered += 1
                    on_packet(packet_id, payload, now)
        finally:
            try:
                if delivered:
                    self._received += delivered
                    self._wakeups += 1
                    if group.after_wakeup is not None:
                        group.after_wakeup()
            finally:
                group.active = False
                group.flush()

    # -- verdicts --------------------------------------------------------------------------

    def accept(self, handle: Any, payload: bytes | None = None) -> None:
        if payload is not None and self._config.gso:
            # The kernel copies GSO-queue packets out with partial checksums and marks a
            # rewritten packet CHECKSUM_NONE (nfqnl_mangle): an incremental checksum update
            # of a partial checksum would leave with a wrong one.
            raise UsageError(
                f"queue {self._config.queue_num}: payload rewrites need gso off "
                "(packets of a GSO queue carry partial checksums)"
            )
        try:
            self._undecided.remove(handle)
        except KeyError:
            self._unknown(handle)
            return
        if payload is None:
            if self._run_verdict != NF_ACCEPT:
                self._encode_run()
                self._run_verdict = NF_ACCEPT
            self._run.append(handle)
        else:
            self._encode_run()
            self._out += self._codec.accept_with_payload(handle, payload)
        if not self._group.active and not self._flush_scheduled:
            self._schedule_flush()

    def requeue(self, handle: Any, queue_num: int) -> None:
        """Send the packet on to queue ``queue_num`` at the same hook (an NF_QUEUE verdict):
        a queue without the GSO flag gets a GSO packet cut into its segments, each a packet
        of its own (nfqnl_enqueue_packet); accepted there, each goes on past this hook."""
        try:
            self._undecided.remove(handle)
        except KeyError:
            self._unknown(handle)
            return
        self._encode_run()
        self._out += build_verdict(self._config.queue_num, handle, NF_QUEUE | queue_num << 16)
        if not self._group.active and not self._flush_scheduled:
            self._schedule_flush()

    def drop(self, handle: Any) -> None:
        try:
            self._undecided.remove(handle)
        except KeyError:
            self._unknown(handle)
            return
        if self._run_verdict != NF_DROP:
            self._encode_run()
            self._run_verdict = NF_DROP
        self._run.append(handle)
        if not self._group.active and not self._flush_scheduled:
            self._schedule_flush()

    def _unknown(self, handle: Any) -> None:
        if self._state is QueueState.CLOSED:
            return  # the kernel dropped it at close; nothing left to decide
        raise UsageError(
            f"queue {self._config.queue_num}: no packet {handle!r} awaits a verdict "
            "(decided twice, or from another queue?)"
        )

    def _schedule_flush(self) -> None:
        assert self._loop is not None
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _encode_run(self) -> None:
        """Turn the pending run into one verdict message per packet, after what is encoded."""
        run = self._run
        if not run:
            return
        out = self._out
        prefix = self._prefix[self._run_verdict]
        pack = BE32.pack
        for packet_id in run:
            out += prefix
            out += pack(packet_id)
        run.clear()

    def flush(self) -> None:
        """Send every verdict given so far, now."""
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        sock = self._sock
        if sock is None:
            self._run.clear()
            self._out.clear()
            return
        run = self._run
        if not run and not self._out:
            return
        try:
            if run and not self._out and not self._undecided and _ascending(run):
                # Every delivered packet up to run[-1] is in the run: one batch verdict.
                sock.send(self._batch_prefix[self._run_verdict] + BE32.pack(run[-1]))
                self._batch_verdicts += 1
                self._verdict_sends += 1
                run.clear()
                return
            self._encode_run()
            self._send_out(sock)
        except OSError as exc:
            # What was not sent stays queued: the next flush (or close) tries it again.
            # Verdicts lost here would hold their packets in the kernel until close.
            message = f"queue {self._config.queue_num}: sending verdicts failed: {exc}"
            raise _caused(QueueError(message, self._config.queue_num), exc) from exc

    def _send_out(self, sock: socket.socket) -> None:
        """Send the encoded verdicts, in datagrams of at most _MAX_SEND bytes."""
        out = self._out
        sent = 0
        try:
            if len(out) <= _MAX_SEND:
                sock.send(out)
                self._verdict_sends += 1
                sent = len(out)
                return
            with memoryview(out) as view:
                start = 0
                # Cut at message boundaries: verdicts with payloads are longer than 32 bytes.
                for _type, _flags, _seq, msg_start, msg_end in iter_messages(view):
                    if msg_end - start > _MAX_SEND:
                        sock.send(view[start:msg_start])
                        self._verdict_sends += 1
                        start = sent = msg_start
                sock.send(view[start:])
                self._verdict_sends += 1
                sent = len(out)
        finally:
            del out[:sent]

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        sock = self._sock
        if self._state is QueueState.OPEN and sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(sock.fileno())
            try:
                # Verdicts already given stand; the undecided are dropped by the unbind.
                self._flush()
                sock.send(
                    build_config(self._config.queue_num, command=NFQNL_CFG_CMD_UNBIND, ack=False)
                )
            except (OSError, QueueError) as exc:
                # Closing the socket unbinds the queue anyway (NETLINK_URELEASE).
                log.warning("queue %d: unbind: %s", self._config.queue_num, exc)
            sock.close()
        self._sock = None
        self._slots = None
        self._undecided.clear()
        self._run.clear()
        self._out.clear()
        self._state = QueueState.CLOSED

    def counters(self) -> QueueCounters:
        return QueueCounters(
            received=self._received,
            wakeups=self._wakeups,
            truncated=self._truncated,
            kernel_errors=self._kernel_errors,
            verdict_sends=self._verdict_sends,
            batch_verdicts=self._batch_verdicts,
        )
