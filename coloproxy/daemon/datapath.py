"""The packets' way through this host (shell): the proxy of the role bound to its queues, or
to QEMU's chardev sockets, every input followed by a poke of the timer pump.

- Host P, NFQUEUE: P-out and S-out into ``PrimaryProxy`` (GSO), and the split queue where
  P-out's ``Split`` verdicts come back cut into segments (netlink only).
- Host P, chardev transport: the same proxy and comparator fed whole receive batches by
  :class:`ChardevTransport`, whose verdicts write released frames to outdev
  (docs/chardev.md).
- Host S: S-in and egress into ``SecondaryProxy`` (never GSO: rewritten packets go back with
  complete checksums).

Both primaries are built by :meth:`DataPath.new_primary`: the comparator, its proxy (which
asks for its restart checkpoint at once, I6), the pump and the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from coloproxy.capture.chardev import ChardevTransport
from coloproxy.capture.netlink import NetlinkQueue, WakeGroup
from coloproxy.capture.queue import OnPacket, PacketQueue, QueueConfig
from coloproxy.capture.stats import read_queue_stats
from coloproxy.capture.transports import open_queue
from coloproxy.compare import Comparator, CompareConfig
from coloproxy.config import ChardevConfig, QueuesConfig, Transport
from coloproxy.daemon.primary import PrimaryProxy, RequestSink
from coloproxy.daemon.record import Recorder
from coloproxy.daemon.secondary import SecondaryProxy
from coloproxy.daemon.state import DaemonState
from coloproxy.metrics import Metrics
from coloproxy.pump import TimerPump
from coloproxy.rewrite import SecondaryRewriter

# A receive batch of one side of the chardev transport: (tokens, frames, now).
_BatchFeed = Callable[[Sequence[object], Sequence[bytes], float], None]


@dataclass(eq=False)
class DataPath:
    state: DaemonState
    pump: TimerPump  # also the clock: the proxies' deadlines are on the pump's loop
    metrics: Metrics
    requests: RequestSink  # where the primary proxy's checkpoint requests go
    recorder: Recorder | None  # --record
    queues: list[PacketQueue] = field(default_factory=list)

    def close_queues(self) -> None:
        for queue in self.queues:
            queue.close()
        self.queues = []

    # -- host P ------------------------------------------------------------------------------

    def new_primary(self, compare: CompareConfig, release_until: float) -> PrimaryProxy:
        """The comparator and its proxy, with no queues yet (both transports), pumped and
        counted; it asks for its restart checkpoint (I6) at once."""
        comparator = Comparator(compare)
        proxy = PrimaryProxy(comparator, _Late(), _Late(), self.requests, self.pump.now())
        proxy.release_until = release_until
        self.state.comparator = comparator
        self.state.proxy = proxy
        self.pump.target = proxy
        metrics = self.metrics
        metrics.counts = proxy.counters
        metrics.compare_stats = comparator.stats
        metrics.compare_bounds = lambda: (
            comparator.config.max_held_packets,
            comparator.config.max_held_bytes,
        )
        return proxy

    def nfqueue_compare(self) -> CompareConfig:
        """The file's comparator settings as the NFQUEUE transport can serve them."""
        config = self.state.config
        queues = self._queues()
        compare = config.compare
        if queues.transport is not Transport.NETLINK:  # netfilterqueue: no NF_QUEUE verdict
            compare = dataclasses.replace(compare, split_after=None)
        mtu = _guest_mtu(config.net.guest_port)
        if mtu is not None and mtu > compare.gso_above:
            compare = dataclasses.replace(compare, gso_above=mtu)
        return compare

    def open_primary(self, proxy: PrimaryProxy) -> None:
        """Host P on the NFQUEUE transport: P-out, S-out and the split queue into ``proxy``."""
        queues = self._queues()
        netlink = queues.transport is Transport.NETLINK
        self._queue_metrics(
            {
                queues.primary_out: "primary-out",
                queues.secondary_out: "secondary-out",
                queues.primary_split: "primary-split",
            }
        )
        poke = self.pump.poke
        recorder = self.recorder
        # Netlink: the three queues' verdicts go out together at the end of any one's
        # wake-up, the pump looks at the proxy's deadline once per wake-up, and the queues
        # call the proxy directly. netfilterqueue (or --record): a poke after every packet.
        group = WakeGroup(self.pump.settle) if netlink else None
        primary: OnPacket = proxy.on_primary
        secondary: OnPacket = proxy.on_secondary
        if recorder is not None or group is None:

            def primary(handle: object, payload: bytes, now: float) -> None:
                if recorder is not None:
                    recorder.write("primary", payload)
                proxy.on_primary(handle, payload, now)
                poke()

            def secondary(handle: object, payload: bytes, now: float) -> None:
                if recorder is not None:
                    recorder.write("secondary", payload)
                proxy.on_secondary(handle, payload, now)
                poke()

        def split_segment(handle: object, payload: bytes, now: float) -> None:
            primary(_SplitSegment(handle), payload, now)

        # Whole GSO packets: these verdicts carry no new payload (bench/nfqueue_README.md).
        primary_out = self._open_queue(queues.primary_out, primary, gso=True, group=group)
        secondary_out = self._open_queue(queues.secondary_out, secondary, gso=True, group=group)
        if netlink:
            # No rule feeds this queue: only P-out's Split verdicts, whose GSO packets the
            # kernel cuts into segments on the way in (no GSO flag here).
            split = self._open_queue(queues.primary_split, split_segment, gso=False, group=group)
            proxy.bind(_SplittingOut(primary_out, split), secondary_out)
        else:
            proxy.bind(primary_out, secondary_out)

    async def start_chardev(self, chardev: ChardevConfig, release_until: float) -> None:
        """The primary fed by QEMU's filters over colo-compare's sockets: the same proxy and
        comparator (Ethernet framing), no S-in (QEMU's filter-rewriter shifts the secondary's
        TCP numbers), verdicts that write released frames to outdev (docs/chardev.md)."""
        # The chardev transport cannot hand a frame back to be cut up: no Split.
        compare = dataclasses.replace(self.state.config.compare, split_after=None)
        proxy = self.new_primary(compare, release_until)
        poke = self.pump.poke
        recorder = self.recorder

        def batches(side: str, feed: _BatchFeed) -> _BatchFeed:
            def callback(tokens: Sequence[object], packets: Sequence[bytes], now: float) -> None:
                if recorder is not None:
                    for packet in packets:
                        recorder.write(side, packet)
                feed(tokens, packets, now)
                poke()

            return callback

        primary = batches("primary", proxy.on_primary_many)
        secondary = batches("secondary", proxy.on_secondary_many)

        def damaged(reason: str, now: float) -> None:
            # A frame was lost on an input: make the secondary equal to the primary again
            # now rather than at the comparator's timeout.
            proxy.request_manual(now, reason)

        def xen_checkpoint_done(now: float) -> None:
            # Xen's COLO frame checkpointed (COLO_CHECKPOINT): release and compare afresh,
            # as colo-compare's colo_flush_packets does.
            proxy.checkpoint_started(now)
            proxy.checkpoint_completed(now)
            poke()

        transport = ChardevTransport(chardev, primary, secondary, damaged, xen_checkpoint_done)
        self.state.chardev = transport
        proxy.bind(transport.primary_verdicts, transport.secondary_verdicts)
        self.metrics.chardev = transport
        await transport.start()
        if proxy.outstanding is not None:  # the restart request (I6), for Xen too
            transport.request_checkpoint()

    # -- host S ------------------------------------------------------------------------------

    def start_secondary(self) -> None:
        """Host S: the rewriter of the SVM's TCP sequence spaces on its two queues."""
        queues = self.state.config.queues
        if queues is None:  # the config loader fills in the defaults on a secondary
            raise ValueError("secondary without queues")
        proxy = SecondaryProxy(SecondaryRewriter(), _Late(), _Late())
        self.state.secondary = proxy
        self.pump.target = proxy  # S-in's hold across the SVM's checkpoint
        self.metrics.counts = proxy.counters
        self._queue_metrics(
            {queues.secondary_in: "secondary-in", queues.secondary_egress: "secondary-egress"}
        )
        # Never GSO here: rewritten packets go back with complete checksums. Nothing on these
        # two queues decides the other's packets and the proxy's deadline moves only on the
        # engine's reports (poked there): no group.
        to_guest = self._open_queue(queues.secondary_in, proxy.on_to_guest, gso=False)
        from_guest = self._open_queue(queues.secondary_egress, proxy.on_from_guest, gso=False)
        proxy.bind(to_guest, from_guest)

    # -- queues ------------------------------------------------------------------------------

    def _queues(self) -> QueuesConfig:
        queues = self.state.config.queues
        if queues is None:  # the config loader requires queues on a primary
            raise ValueError("primary without queues")
        return queues

    def _open_queue(
        self,
        number: int,
        callback: Callable[[object, bytes, float], None],
        *,
        gso: bool,
        group: WakeGroup | None = None,
    ) -> PacketQueue:
        queues = self.state.config.queues
        assert queues is not None
        netlink = queues.transport is Transport.NETLINK
        queue_config = QueueConfig(
            number,
            max_len=queues.max_len,
            copy_range=queues.copy_range,
            rcvbuf=queues.rcvbuf,
            gso=netlink and gso,
            # P-out's packets leave the host, S-out's are dropped, S-in's and egress's go
            # into or come from a VM: no answer ever comes back to the same queue during a
            # verdict's send.
            replies_here=False,
        )
        queue = open_queue(queue_config, callback, queues.transport, group)
        self.queues.append(queue)
        return queue

    def _queue_metrics(self, numbers: dict[int, str]) -> None:
        self.metrics.queue_names = numbers
        self.metrics.queue_stats = lambda: [
            s for n, s in read_queue_stats().items() if n in numbers
        ]


class _SplitSegment:
    """The token of a packet from the split queue (a segment of a GSO packet that P-out
    handed back): its verdict goes to that queue."""

    __slots__ = ("handle",)

    def __init__(self, handle: object) -> None:
        self.handle = handle


class _SplittingOut:
    """P-out's verdicts with the split queue beside it (``Split``, docs/data-path.md)."""

    def __init__(self, primary_out: PacketQueue, split: PacketQueue) -> None:
        self._primary_out = primary_out
        self._split = split
        self._split_number = split.config.queue_num

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        if type(handle) is _SplitSegment:
            self._split.accept(handle.handle, payload)
        else:
            self._primary_out.accept(handle, payload)

    def drop(self, handle: object) -> None:  # never for a primary packet; here for Verdicts
        if type(handle) is _SplitSegment:
            self._split.drop(handle.handle)
        else:
            self._primary_out.drop(handle)

    def split(self, handle: object) -> None:
        # Only P-out's own packets are longer than the MTU: a segment is never split again.
        cast(NetlinkQueue, self._primary_out).requeue(handle, self._split_number)


def _guest_mtu(guest_port: str) -> int | None:
    """The guest port's MTU in this namespace (sysfs), None when it cannot be read."""
    try:
        return int(Path(f"/sys/class/net/{guest_port}/mtu").read_text())
    except (OSError, ValueError):
        return None


class _Late:
    """Stands in for a queue until the queues are open (the proxy is built first)."""

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        raise RuntimeError("queue not open yet")

    def drop(self, handle: object) -> None:
        raise RuntimeError("queue not open yet")
