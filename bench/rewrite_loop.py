#!/usr/bin/env python3
"""Host S's S-in rewrite per packet, in process, no syscalls: for callgrind.

    python3 bench/rewrite_loop.py [--workload ack|data] [--packets N] [--runs R]
    valgrind --tool=callgrind python3 bench/rewrite_loop.py --workload ack --runs 1
    valgrind --tool=callgrind python3 bench/rewrite_loop.py --workload ack --setup-only

What ``coloproxy run`` on host S does with one packet of queue S-in between the netlink
receive and the verdict: ``SecondaryProxy.on_to_guest`` (``SecondaryRewriter.to_guest``:
parse, keep the client's latest ACK, shift the ACK, SACK edges and TSecr into the SVM's space
with the checksum updated, copy out), the counters, the queue's ``accept``. Not included: the
netlink receive and verdict, the event loop. The connection's offsets are learnt first (the
SVM's SYN-ACK on the egress queue, the client's handshake ACK on S-in), as in the lab.
Workloads, client -> guest with timestamps: ``ack`` (pure ACKs, 52-byte TCP, a download's
S-in) and ``data`` (1448-byte segments, an upload's). Under callgrind, (instructions of
``--runs 1``) minus (instructions of ``--setup-only``), divided by the packets, is the
instructions per S-in packet.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Final

REPO_ROOT: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

CLIENT: Final = "10.0.0.1"
GUEST: Final = "10.0.0.2"
CLIENT_PORT, GUEST_PORT = 40000, 80
CLIENT_ISN, PVM_ISN, SVM_ISN = 1000, 5000, 900_000
TSVAL_CLIENT, TSVAL_PVM, TSVAL_SVM = 7000, 100, 77_000
DISTINCT: Final = 1000  # packets built; the loop cycles through them


def _tcp(src: str, dst: str, sport: int, dport: int, **fields: object) -> bytes:
    from scapy.layers.inet import IP, TCP

    tsval, tsecr = fields.pop("ts")  # type: ignore[misc]
    payload = fields.pop("payload", b"")
    segment = TCP(sport=sport, dport=dport, options=[("Timestamp", (tsval, tsecr))], **fields)
    return bytes(IP(src=src, dst=dst) / segment / payload)  # type: ignore[operator]


def packets(workload: str) -> tuple[bytes, bytes, list[bytes]]:
    """The SVM's SYN-ACK, the client's handshake ACK and ``DISTINCT`` S-in packets."""
    syn_ack = _tcp(
        GUEST, CLIENT, GUEST_PORT, CLIENT_PORT, flags="SA", seq=SVM_ISN, ack=CLIENT_ISN + 1,
        ts=(TSVAL_SVM, TSVAL_CLIENT),
    )  # fmt: skip
    handshake = _tcp(
        CLIENT, GUEST, CLIENT_PORT, GUEST_PORT, flags="A", seq=CLIENT_ISN + 1, ack=PVM_ISN + 1,
        ts=(TSVAL_CLIENT + 1, TSVAL_PVM),
    )  # fmt: skip
    length = 1448 if workload == "data" else 0
    out = []
    for index in range(DISTINCT):
        sent = index * length
        acked = 0 if length else index * 1448
        segment = _tcp(
            CLIENT, GUEST, CLIENT_PORT, GUEST_PORT, flags="A" if length == 0 else "PA",
            seq=CLIENT_ISN + 1 + sent, ack=PVM_ISN + 1 + acked,
            ts=(TSVAL_CLIENT + 2 + index, TSVAL_PVM + index), payload=b"x" * length,
        )  # fmt: skip
        out.append(segment)
    return syn_ack, handshake, out


class _Queue:
    def __init__(self) -> None:
        self.accepted = 0

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        self.accepted += 1

    def drop(self, handle: object) -> None:
        raise SystemExit("S-in never drops")


def run(syn_ack: bytes, handshake: bytes, received: list[bytes], count: int) -> float:
    """CPU seconds for ``count`` S-in packets; checks they were all shifted and accepted."""
    from coloproxy.daemon.secondary import SecondaryProxy
    from coloproxy.rewrite import SecondaryRewriter

    to_guest, from_guest = _Queue(), _Queue()
    proxy = SecondaryProxy(SecondaryRewriter(), to_guest, from_guest)
    proxy.on_from_guest(None, syn_ack, 0.0)
    proxy.on_to_guest(None, handshake, 0.0)
    on_to_guest = proxy.on_to_guest
    distinct = len(received)
    started = time.process_time()
    for index in range(count):
        on_to_guest(index, received[index % distinct], 1.0)
    seconds = time.process_time() - started
    shifted = proxy.counters.rewrites["shifted"]
    if to_guest.accepted != count + 1 or shifted != count + 1:  # the handshake ACK too
        raise SystemExit(f"accepted {to_guest.accepted}, shifted {shifted} of {count}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("ack", "data"), default="ack")
    parser.add_argument("--packets", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3, help="loops, the best is shown")
    parser.add_argument("--setup-only", action="store_true", help="build, do not run the loop")
    args = parser.parse_args()
    from coloproxy import variant

    syn_ack, handshake, received = packets(args.workload)
    if args.setup_only:
        import coloproxy.daemon.secondary
        import coloproxy.rewrite  # noqa: F401  the same imports as a run

        variant.describe()  # imports every compiled module, as the run's last line does
        return 0
    best = min(run(syn_ack, handshake, received, args.packets) for _ in range(max(1, args.runs)))
    print(
        f"{args.workload}: {best / args.packets * 1e6:.2f} us CPU per S-in packet (best of "
        f"{args.runs}, {args.packets:,} packets; {variant.describe()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
