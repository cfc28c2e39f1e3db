"""The capture transports by name: ``open_queue`` builds and opens the one the configuration says.

``queues.transport`` (``coloproxy.config.Transport``) names one; each implements the
interface of ``queue.py``:

* ``netlink``: ``NetlinkQueue`` (``netlink.py``), our own nfnetlink client, the default;
* ``netfilterqueue``: ``NfQueue`` (``libnfq.py``), the library binding, an optional extra.
"""

from __future__ import annotations

from coloproxy.capture.libnfq import NfQueue
from coloproxy.capture.netlink import NetlinkQueue, WakeGroup
from coloproxy.capture.queue import OnPacket, PacketQueue, QueueConfig
from coloproxy.config import Transport
from coloproxy.errors import InputError

__all__ = ["open_queue"]


def open_queue(
    config: QueueConfig,
    on_packet: OnPacket,
    transport: Transport | str = Transport.NETLINK,
    group: WakeGroup | None = None,
) -> PacketQueue:
    """Build and open the queue of ``transport``; call from the running loop's thread.
    ``group``: the netlink queues whose verdicts go out together (ignored by netfilterqueue).

    The default is the netlink transport: it measured faster without GSO (batched verdicts,
    recvmmsg) and is the only one that can take GSO packets (bench/nfqueue_README.md).
    """
    try:
        kind = Transport(transport)
    except ValueError as exc:
        known = ", ".join(t.value for t in Transport)
        raise InputError(f"unknown capture transport {transport!r} (known: {known})") from exc
    queue: PacketQueue
    if kind is Transport.NETLINK:
        queue = NetlinkQueue(config, on_packet, group)
    else:
        queue = NfQueue(config, on_packet)
    queue.open()
    return queue
