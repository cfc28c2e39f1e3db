"""Host S's rewriter: offsets learnt from the SVM's SYN-ACK and the client's handshake ACK."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6

from coloproxy.errors import UsageError
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
    assert rewriter.to_guest(from_client("S", 0, tsecr=None), now=0.0).payload is None
    rewriter.from_guest(from_svm("SA", SVM_ISN))
    rewriter.to_guest(from_client("A", PVM_ISN + 1), now=0.0)


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
    outcome = rewriter.to_guest(from_client("A", PVM_ISN + 1), now=0.0)
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) == (-1500, SVM_TSVAL - PVM_TSVAL)
    # The handshake ACK itself already reaches the SVM in its own space.
    assert outcome.status is RewriteStatus.SHIFTED and outcome.payload is not None
    got = fields(outcome.payload)
    assert (got["ack"], got["tsecr"], got["checksum_ok"]) == ((SVM_ISN + 1) % 2**32, SVM_TSVAL, 1)


def test_client_acks_and_sack_edges_are_shifted_into_the_svm_space() -> None:
    rewriter = SecondaryRewriter()
    handshake(rewriter)
    outcome = rewriter.to_guest(
        from_client("A", PVM_ISN + 3001, sack=(PVM_ISN + 4001, PVM_ISN + 5001), payload=b"x"),
        now=0.0,
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
    assert (
        rewriter.to_guest(from_client("A", PVM_ISN + 10), now=0.0).status is RewriteStatus.NO_OFFSET
    )
    handshake(rewriter)
    rewriter.take_over()
    rewriter.checkpoint_applied()  # the RESUME after x-colo-lost-heartbeat is no checkpoint
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) is not None


def test_a_connection_opened_after_the_takeover_learns_zero_and_is_not_kept() -> None:
    rewriter = SecondaryRewriter()
    rewriter.take_over()
    rewriter.from_guest(from_svm("SA", SVM_ISN, sport=81))
    outcome = rewriter.to_guest(from_client("A", SVM_ISN + 1, tsecr=SVM_TSVAL, dport=81), now=0.0)
    assert outcome.status is RewriteStatus.NO_OFFSET
    assert len(rewriter) == 0 and rewriter.learnt == 1
    assert rewriter.from_guest(from_svm("A", SVM_ISN + 1, sport=81)).payload is None


def test_port_reuse_forgets_the_old_connection() -> None:
    rewriter = SecondaryRewriter()
    handshake(rewriter)
    rewriter.to_guest(from_client("S", 0, tsecr=None), now=0.0)
    assert len(rewriter) == 0
    # A new SYN-ACK with another ISN replaces a learnt connection too.
    handshake(rewriter)
    rewriter.from_guest(from_svm("SA", 7))
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) is None


def test_a_retransmitted_syn_ack_updates_the_tsval_the_client_will_echo() -> None:
    rewriter = SecondaryRewriter()
    rewriter.from_guest(from_svm("SA", SVM_ISN))
    rewriter.from_guest(from_svm("SA", SVM_ISN, tsval=SVM_TSVAL + 1000))
    rewriter.to_guest(from_client("A", PVM_ISN + 1, tsecr=PVM_TSVAL + 1000), now=0.0)
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) == (-1500, SVM_TSVAL - PVM_TSVAL)


def test_without_timestamps_only_the_isn_offset_is_learnt() -> None:
    rewriter = SecondaryRewriter()
    rewriter.from_guest(from_svm("SA", SVM_ISN, tsval=None))
    rewriter.to_guest(from_client("A", PVM_ISN + 1, tsecr=None), now=0.0)
    assert rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000) == (-1500, 0)


def test_the_table_is_bounded_oldest_first() -> None:
    rewriter = SecondaryRewriter(max_connections=2)
    for port in (81, 82, 83):
        rewriter.from_guest(from_svm("SA", SVM_ISN, sport=port))
    assert len(rewriter) == 2 and rewriter.evicted == 1
    rewriter.to_guest(from_client("A", PVM_ISN + 1, dport=81), now=0.0)
    assert rewriter.sequence_offsets(GUEST_B, 81, CLIENT_B, 40000) is None
    rewriter.to_guest(from_client("A", PVM_ISN + 1, dport=83), now=0.0)
    assert rewriter.sequence_offsets(GUEST_B, 83, CLIENT_B, 40000) is not None


def test_non_tcp_and_malformed_packets_pass_unchanged() -> None:
    rewriter = SecondaryRewriter()
    rewriter.take_over()
    assert rewriter.from_guest(b"\x45\x00").status is RewriteStatus.MALFORMED
    ping = bytes(IPv6(src="fd00::1", dst="fd00::9", nh=58) / b"\x80\x00\x00\x00")
    assert rewriter.from_guest(ping).status is RewriteStatus.NOT_TCP
    assert rewriter.to_guest(ping, now=0.0).status is RewriteStatus.NOT_TCP


# -- the client SYNs replayed at a takeover ------------------------------------------------------


def half_open(rewriter: SecondaryRewriter, now: float, dport: int = 80) -> bytes:
    """The client's SYN reached the SVM at ``now``, the SVM answered; no client ACK yet."""
    syn = from_client("S", 0, tsecr=None, dport=dport)
    rewriter.to_guest(syn, now=now)
    rewriter.from_guest(from_svm("SA", SVM_ISN, sport=dport))
    return syn


def test_a_half_open_connections_syn_is_replayed_once_after_the_takeover() -> None:
    rewriter = SecondaryRewriter()
    syn = half_open(rewriter, now=10.0)
    assert rewriter.kept_syns == 1
    rewriter.take_over()
    assert rewriter.replay_syns(now=10.4) == [syn]
    assert rewriter.replay_syns(now=10.5) == []  # once
    half_open(rewriter, now=10.6, dport=81)  # from the LAN now: its SYN-ACK reaches the client
    assert rewriter.kept_syns == 0


def test_the_replay_before_a_takeover_is_refused() -> None:
    rewriter = SecondaryRewriter()
    half_open(rewriter, now=1.0)
    with pytest.raises(UsageError):
        rewriter.replay_syns(now=1.1)


def test_syns_of_connections_not_half_open_on_the_svm_are_not_replayed() -> None:
    rewriter = SecondaryRewriter()
    half_open(rewriter, now=1.0, dport=80)
    rewriter.to_guest(from_client("A", PVM_ISN + 1, dport=80), now=1.1)  # handshake done
    half_open(rewriter, now=1.0, dport=81)
    rewriter.to_guest(from_client("R", 0, tsecr=None, dport=81), now=1.1)  # the client gave up
    rewriter.to_guest(from_client("S", 0, tsecr=None, dport=82), now=1.0)  # no SYN-ACK yet
    assert rewriter.kept_syns == 1
    rewriter.take_over()
    assert rewriter.replay_syns(now=1.2) == []


def test_only_recent_syns_are_replayed_and_a_resent_syn_is_recent() -> None:
    rewriter = SecondaryRewriter(max_syn_age=5.0)
    half_open(rewriter, now=1.0, dport=80)
    half_open(rewriter, now=1.0, dport=81)
    resent = from_client("S", 0, tsecr=None, dport=81)
    rewriter.to_guest(resent, now=4.0)  # the client's second SYN, 3 s after its first
    rewriter.from_guest(from_svm("SA", SVM_ISN, sport=81))  # the SVM answers it again
    rewriter.take_over()
    assert rewriter.replay_syns(now=7.5) == [resent]


def test_a_checkpoint_forgets_the_kept_syns_until_a_takeover() -> None:
    rewriter = SecondaryRewriter()
    half_open(rewriter, now=1.0)
    rewriter.checkpoint_applied()  # the SVM's half-open requests are the PVM's now
    assert rewriter.kept_syns == 0
    syn = half_open(rewriter, now=2.0)
    rewriter.take_over()
    rewriter.checkpoint_applied()  # the RESUME after x-colo-lost-heartbeat is no checkpoint
    assert rewriter.replay_syns(now=2.1) == [syn]


def test_kept_syns_are_bounded_oldest_first() -> None:
    rewriter = SecondaryRewriter(max_kept_syns=2)
    half_open(rewriter, now=1.0, dport=81)
    newer = [half_open(rewriter, now=1.0, dport=port) for port in (82, 83)]
    assert rewriter.kept_syns == 2 and rewriter.syns_evicted == 1
    half_open(rewriter, now=1.1, dport=82)  # the same four-tuple again: replaced, not evicted
    assert rewriter.syns_evicted == 1
    rewriter.take_over()
    assert rewriter.replay_syns(now=1.2) == [newer[1], newer[0]]


def test_after_the_replay_a_client_in_syn_sent_learns_zero() -> None:
    """It takes the SVM's SYN-ACK: its ACK acknowledges the SVM's ISN, nothing to shift."""
    rewriter = SecondaryRewriter()
    half_open(rewriter, now=1.0)
    rewriter.take_over()
    assert len(rewriter.replay_syns(now=1.3)) == 1
    resent = from_svm("SA", SVM_ISN, tsval=SVM_TSVAL + 300)  # the SVM answers at once
    assert rewriter.from_guest(resent).payload is None  # nothing learnt: passes unchanged
    outcome = rewriter.to_guest(from_client("A", SVM_ISN + 1, tsecr=SVM_TSVAL + 300), now=1.31)
    assert outcome.status is RewriteStatus.NO_OFFSET
    assert len(rewriter) == 0 and rewriter.learnt == 1


def test_after_the_replay_a_client_established_with_the_pvm_teaches_the_offset() -> None:
    """It had the PVM's SYN-ACK (its handshake ACK died with host P): the SVM's SYN-ACK is out
    of its window and it answers with an ACK of the PVM's ISN + 1 echoing the PVM's TSval."""
    rewriter = SecondaryRewriter()
    half_open(rewriter, now=1.0)
    rewriter.take_over()
    assert len(rewriter.replay_syns(now=1.3)) == 1
    rewriter.from_guest(from_svm("SA", SVM_ISN, tsval=SVM_TSVAL + 300))
    rewriter.to_guest(from_client("A", PVM_ISN + 1, tsecr=PVM_TSVAL), now=1.31)
    offsets = rewriter.sequence_offsets(GUEST_B, 80, CLIENT_B, 40000)
    # The TSval offset is the retransmission's: the SVM's TSvals reach the client lower than
    # its clock by the time between the two SYN-ACKs, never below the PVM's echoed TSval (PAWS).
    assert offsets == (-1500, SVM_TSVAL + 300 - PVM_TSVAL)
    outcome = rewriter.from_guest(from_svm("A", (SVM_ISN + 1) % 2**32, tsval=SVM_TSVAL + 301))
    assert outcome.payload is not None
    got = fields(outcome.payload)
    assert (got["seq"], got["tsval"]) == (PVM_ISN + 1, PVM_TSVAL + 1)


def unreachable(message: bytes) -> tuple[int, int, str, str, str, int, int, int]:
    """(type, code, reporter, quoted source, quoted destination, ports, seq) of an ICMP error."""
    outer = IP(message)
    quoted = IP(bytes(outer[ICMP].payload)[:20])
    tcp = bytes(outer[ICMP].payload)[20:28]
    sport, dport, number = struct.unpack("!HHI", tcp)
    return (
        outer[ICMP].type,
        outer[ICMP].code,
        outer.src,
        quoted.src,
        quoted.dst,
        sport,
        dport,
        number,
    )


def test_the_svm_gets_the_clients_latest_segment_and_icmp_errors_at_its_ack() -> None:
    """A connection opened since the last checkpoint: the client acknowledges the PVM's
    numbers, the SVM's oldest unacknowledged byte is that ACK plus the ISN offset."""
    rewriter = SecondaryRewriter()
    handshake(rewriter)
    rewriter.to_guest(from_client("A", PVM_ISN + 1 + 700), now=1.0)
    latest = from_client("PA", PVM_ISN + 1 + 900, payload=b"more")
    rewriter.to_guest(latest, now=2.0)
    rewriter.take_over()
    ((replayed, *messages),) = rewriter.backoff_reverts(now=3.0, reverts=3)
    # the latest segment once more, its ACK shifted into the SVM's space as S-in does
    assert IP(replayed)[TCP].ack == (SVM_ISN + 1 + 900) % 2**32
    assert bytes(IP(replayed)[TCP].payload) == b"more"
    assert len(messages) == 3 and len(set(messages)) == 1  # three copies: three steps undone
    assert unreachable(messages[0]) == (
        3, 1, CLIENT, GUEST, CLIENT, 80, 40000, (SVM_ISN + 1 + 900) % 2**32
    )  # fmt: skip
    assert rewriter.backoff_reverts(now=3.1) == []  # once


def test_a_connection_predating_the_last_checkpoint_is_named_by_the_clients_own_ack() -> None:
    rewriter = SecondaryRewriter()
    latest = from_client("A", 123456)
    rewriter.to_guest(latest, now=1.0)  # no handshake seen: offset 0
    rewriter.take_over()
    ((replayed, message),) = rewriter.backoff_reverts(now=1.5, reverts=1)
    assert replayed == latest
    assert unreachable(message)[-1] == 123456


def test_after_the_clients_fin_its_segments_are_not_replayed() -> None:
    """Its last ACK may have closed the connection on the SVM, which would answer a copy with
    a reset; the ICMP errors are ignored by a closed connection."""
    rewriter = SecondaryRewriter()
    rewriter.to_guest(from_client("FA", 500), now=1.0)
    rewriter.to_guest(from_client("A", 501), now=1.1)
    rewriter.take_over()
    ((message,),) = rewriter.backoff_reverts(now=1.5, reverts=1)
    assert unreachable(message)[-1] == 501


def test_only_connections_heard_from_recently_get_a_revert_and_an_rst_forgets() -> None:
    rewriter = SecondaryRewriter(max_ack_age=30.0)
    rewriter.to_guest(from_client("A", 5, dport=80), now=1.0)  # silent for 40 s at the takeover
    rewriter.to_guest(from_client("A", 6, dport=81), now=20.0)
    rewriter.to_guest(from_client("A", 7, dport=82), now=20.0)
    rewriter.to_guest(from_client("R", 7, tsecr=None, dport=82), now=21.0)  # the client gave up
    rewriter.take_over()
    reverts = rewriter.backoff_reverts(now=41.0, reverts=1)
    assert [unreachable(c[-1])[-1] for c in reverts] == [6]


def test_kept_acks_are_bounded_least_recently_heard_first() -> None:
    rewriter = SecondaryRewriter(max_acked=2)
    for port, ack in ((80, 1), (81, 2), (80, 3), (82, 4)):  # port 80 heard again before 82
        rewriter.to_guest(from_client("A", ack, dport=port), now=1.0)
    rewriter.take_over()
    reverts = rewriter.backoff_reverts(now=1.1, reverts=1)
    assert [unreachable(c[-1])[-1] for c in reverts] == [3, 4]


def test_the_revert_before_a_takeover_is_refused() -> None:
    rewriter = SecondaryRewriter()
    rewriter.to_guest(from_client("A", 5), now=1.0)
    with pytest.raises(UsageError):
        rewriter.backoff_reverts(now=1.1)


def test_a_connection_over_ipv6_gets_an_icmpv6_no_route() -> None:
    rewriter = SecondaryRewriter()
    client = bytes(
        IPv6(src="fd77::10", dst="fd77::100") / TCP(sport=40000, dport=80, ack=99, flags="A")
    )
    rewriter.to_guest(client, now=1.0)
    rewriter.take_over()
    ((replayed, message),) = rewriter.backoff_reverts(now=1.1, reverts=1)
    assert replayed == client
    outer = IPv6(message)
    error = outer[ICMPv6DestUnreach]
    assert (outer.src, outer.dst, error.code) == ("fd77::10", "fd77::100", 0)
    quoted = bytes(error.payload)
    assert IPv6(quoted[:40]).src == "fd77::100" and quoted[40:48] == struct.pack(
        "!HHI", 80, 40000, 99
    )
    checked = IPv6(message)
    del checked[ICMPv6DestUnreach].cksum
    assert IPv6(bytes(checked))[ICMPv6DestUnreach].cksum == error.cksum
