"""Host S's rewriter: offsets learnt from the SVM's SYN-ACK and the client's handshake ACK."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from coloproxy.rewrite import RewriteStatus, SecondaryRewriter

CLIENT, GUEST = "10.0.0.9", "10.0.0.1"
PVM_ISN, SVM_ISN = 1000, 2**32 - 500  # the SVM's is "before" the PVM's: the offset wraps
PVM_TSVAL, SVM_TSVAL = 5000, 90000
CLIENT_ISN = 77


def from_svm(
    flags: str, seq: int, ack: int = CLIENT_ISN + 1, tsval: int | None = SVM_TSVAL, sport: int = 80
) -> bytes:
    options = [("Timestamp", (tsval, 123))] if tsval is not None else []
    return bytes(
        IP(src=GUEST, dst=CLIENT)
        / TCP(sport=sport, dport=40000, seq=seq, ack=ack, flags=flags, options=options)
    )


def from_client(
    flags: str,
    ack: int,
    tsecr: int | None = PVM_TSVAL,
    sack: tuple[int, int] | None = None,
    dport: int = 80,
    payload: bytes = b"",
) -> bytes:
    options: list[tuple[str, object]] = []
    if tsecr is not None:
        options.append(("Timestamp", (42, tsecr)))
    if sack is not None:
        options += [("NOP", None), ("NOP", None), ("SAck", sack)]
    return bytes(
        IP(src=CLIENT, dst=GUEST)
        / TCP(sport=40000, dport=dport, seq=CLIENT_ISN + 1, ack=ack, flags=flags, options=options)
        / payload
    )


def handshake(rewriter: SecondaryRewriter) -> None:
    assert rewriter.to_guest(from_client("S", 0, tsecr=None)).payload is None
    rewriter.from_guest(from_svm("SA", SVM_ISN))
    rewriter.to_guest(from_client("A", PVM_ISN + 1))


def fields(data: bytes) -> dict[str, int]:
    tcp = IP(data)[TCP]
    stamps = dict(tcp.options).get("Timestamp", (None, None))
    checked = IP(data)
    del checked[TCP].chksum
    return {
        "seq": tcp.seq,
        "ack": tcp.ack,
        "tsval": stamps[0],
        "tsecr": stamps[1],
        "checksum_ok": int(IP(bytes(checked))[TCP].chksum == tcp.chksum),
    }


GUEST_B, CLIENT_B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 9])


def test_offsets_learnt_from_the_svm_syn_ack_and_the_clients_handshake_ack() -> None:
    rewriter = SecondaryRewriter()
    rewriter.from_guest(from_svm("SA", SVM_ISN))
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) is None  # not yet
    outcome = rewriter.to_guest(from_client("A", PVM_ISN + 1))
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) == (-1500, SVM_TSVAL - PVM_TSVAL)
    # The handshake ACK itself already reaches the SVM in its own space.
    assert outcome.status is RewriteStatus.SHIFTED and outcome.payload is not None
    got = fields(outcome.payload)
    assert (got["ack"], got["tsecr"], got["checksum_ok"]) == ((SVM_ISN + 1) % 2**32, SVM_TSVAL, 1)


def test_client_acks_and_sack_edges_are_shifted_into_the_svm_space() -> None:
    rewriter = SecondaryRewriter()
    handshake(rewriter)
    outcome = rewriter.to_guest(
        from_client("A", PVM_ISN + 3001, sack=(PVM_ISN + 4001, PVM_ISN + 5001), payload=b"x")
    )
    assert outcome.payload is not None
    tcp = IP(outcome.payload)[TCP]
    assert tcp.ack == (SVM_ISN + 3001) % 2**32
    assert dict(tcp.options)["SAck"] == ((SVM_ISN + 4001) % 2**32, (SVM_ISN + 5001) % 2**32)
    assert fields(outcome.payload)["checksum_ok"] == 1


def test_svm_output_passes_unchanged_while_protected_and_is_shifted_after_a_takeover() -> None:
    rewriter = SecondaryRewriter()
    handshake(rewriter)
    segment = from_svm("A", (SVM_ISN + 101) % 2**32, tsval=SVM_TSVAL + 7)
    assert rewriter.from_guest(segment).payload is None  # host P compares it as it is
    rewriter.take_over()
    outcome = rewriter.from_guest(segment)
    assert outcome.status is RewriteStatus.SHIFTED and outcome.payload is not None
    got = fields(outcome.payload)
    assert (got["seq"], got["tsval"], got["checksum_ok"]) == (PVM_ISN + 101, PVM_TSVAL + 7, 1)
    assert got["ack"] == CLIENT_ISN + 1  # the client's own space: untouched


def test_partial_checksums_are_completed() -> None:
    rewriter = SecondaryRewriter()
    handshake(rewriter)
    rewriter.take_over()
    raw = bytearray(from_svm("A", (SVM_ISN + 1) % 2**32))
    raw[36:38] = b"\x12\x34"  # a partial checksum is whatever the guest left there
    outcome = rewriter.from_guest(bytes(raw), checksum_partial=True)
    assert outcome.payload is not None and fields(outcome.payload)["checksum_ok"] == 1


def test_a_checkpoint_makes_every_offset_zero_until_a_takeover() -> None:
    rewriter = SecondaryRewriter()
    handshake(rewriter)
    rewriter.checkpoint_applied()
    assert len(rewriter) == 0
    assert rewriter.to_guest(from_client("A", PVM_ISN + 10)).status is RewriteStatus.NO_OFFSET
    handshake(rewriter)
    rewriter.take_over()
    rewriter.checkpoint_applied()  # the RESUME after x-colo-lost-heartbeat is no checkpoint
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) is not None


def test_a_connection_opened_after_the_takeover_learns_zero_and_is_not_kept() -> None:
    rewriter = SecondaryRewriter()
    rewriter.take_over()
    rewriter.from_guest(from_svm("SA", SVM_ISN, sport=81))
    outcome = rewriter.to_guest(from_client("A", SVM_ISN + 1, tsecr=SVM_TSVAL, dport=81))
    assert outcome.status is RewriteStatus.NO_OFFSET
    assert len(rewriter) == 0 and rewriter.learnt == 1
    assert rewriter.from_guest(from_svm("A", SVM_ISN + 1, sport=81)).payload is None


def test_port_reuse_forgets_the_old_connection() -> None:
    rewriter = SecondaryRewriter()
    handshake(rewriter)
    rewriter.to_guest(from_client("S", 0, tsecr=None))
    assert len(rewriter) == 0
    # A new SYN-ACK with another ISN replaces a learnt connection too.
    handshake(rewriter)
    rewriter.from_guest(from_svm("SA", 7))
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) is None


def test_a_retransmitted_syn_ack_updates_the_tsval_the_client_will_echo() -> None:
    rewriter = SecondaryRewriter()
    rewriter.from_guest(from_svm("SA", SVM_ISN))
    rewriter.from_guest(from_svm("SA", SVM_ISN, tsval=SVM_TSVAL + 1000))
    rewriter.to_guest(from_client("A", PVM_ISN + 1, tsecr=PVM_TSVAL + 1000))
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) == (-1500, SVM_TSVAL - PVM_TSVAL)


def test_without_timestamps_only_the_isn_offset_is_learnt() -> None:
    rewriter = SecondaryRewriter()
    rewriter.from_guest(from_svm("SA", SVM_ISN, tsval=None))
    rewriter.to_guest(from_client("A", PVM_ISN + 1, tsecr=None))
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) == (-1500, 0)


def test_the_table_is_bounded_oldest_first() -> None:
    rewriter = SecondaryRewriter(max_connections=2)
    for port in (81, 82, 83):
        rewriter.from_guest(from_svm("SA", SVM_ISN, sport=port))
    assert len(rewriter) == 2 and rewriter.evicted == 1
    rewriter.to_guest(from_client("A", PVM_ISN + 1, dport=81))
    assert rewriter.sequence_offsets(GUEST_B, 81, CLIENT_B, 40000) is None
    rewriter.to_guest(from_client("A", PVM_ISN + 1, dport=83))
    assert rewriter.sequence_offsets(GUEST_B, 83, CLIENT_B, 40000) is not None


def test_non_tcp_and_malformed_packets_pass_unchanged() -> None:
    rewriter = SecondaryRewriter()
    rewriter.take_over()
    assert rewriter.from_guest(b"\x45\x00").status is RewriteStatus.MALFORMED
    ping = bytes(IPv6(src="fd00::1", dst="fd00::9", nh=58) / b"\x80\x00\x00\x00")
    assert rewriter.from_guest(ping).status is RewriteStatus.NOT_TCP
    assert rewriter.to_guest(ping).status is RewriteStatus.NOT_TCP
