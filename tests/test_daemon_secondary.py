"""Host S's pump (SecondaryProxy) across a checkpoint: S-in holds the client's segments while
the SVM loads one, then shifts them with the new state's offsets (none)."""

from __future__ import annotations

from coloproxy.daemon.secondary import S_IN_HOLD_LIMIT, SecondaryProxy
from coloproxy.rewrite import SecondaryRewriter
from test_rewrite_secondary import PVM_ISN, SVM_ISN, fields, from_client, handshake


class Verdicts:
    def __init__(self) -> None:
        self.accepted: list[tuple[object, bytes | None]] = []

    def accept(self, handle: object, payload: bytes | None = None) -> None:
        self.accepted.append((handle, payload))

    def drop(self, handle: object) -> None:
        raise AssertionError("host S never drops")


def proxy_with_an_offset() -> tuple[SecondaryProxy, Verdicts]:
    rewriter = SecondaryRewriter()
    handshake(rewriter)  # a connection opened since the last checkpoint: it has an offset
    to_guest = Verdicts()
    return SecondaryProxy(rewriter, to_guest, Verdicts()), to_guest


def test_segments_that_arrive_while_the_svm_loads_a_checkpoint_get_its_offsets() -> None:
    proxy, to_guest = proxy_with_an_offset()
    proxy.on_to_guest("before", from_client("A", PVM_ISN + 10), 1.0)
    (_, shifted) = to_guest.accepted[0]
    assert shifted is not None and fields(shifted)["ack"] == SVM_ISN + 10  # old state: shifted
    proxy.checkpoint_started(1.0)
    proxy.on_to_guest("fin", from_client("FA", PVM_ISN + 20), 1.01)
    assert [handle for handle, _ in to_guest.accepted] == ["before"]  # held, not shifted
    proxy.checkpoint_applied()
    # The new SVM is a copy of the PVM: the client's FIN reaches it as the client sent it.
    assert to_guest.accepted[1] == ("fin", None)
    assert not proxy.holding


def test_without_a_resume_the_held_segments_go_with_the_offsets_they_had() -> None:
    for end in ("release_held", "take_over"):
        proxy, to_guest = proxy_with_an_offset()
        proxy.checkpoint_started(1.0)
        proxy.on_to_guest("ack", from_client("A", PVM_ISN + 10), 1.0)
        assert to_guest.accepted == []
        getattr(proxy, end)()
        (handle, shifted) = to_guest.accepted[0]
        assert handle == "ack" and shifted is not None
        assert fields(shifted)["ack"] == SVM_ISN + 10


def test_without_a_resume_its_own_timer_lets_the_held_segments_go() -> None:
    proxy, to_guest = proxy_with_an_offset()
    assert proxy.get_timer() is None
    proxy.checkpoint_started(10.0)
    proxy.on_to_guest("ack", from_client("A", PVM_ISN + 10), 10.0)
    assert proxy.get_timer() == 10.0 + S_IN_HOLD_LIMIT
    proxy.handle_timer(10.0 + S_IN_HOLD_LIMIT / 2)  # not yet
    assert to_guest.accepted == [] and proxy.holding
    proxy.handle_timer(10.0 + S_IN_HOLD_LIMIT)
    (handle, shifted) = to_guest.accepted[0]
    assert handle == "ack" and shifted is not None
    assert fields(shifted)["ack"] == SVM_ISN + 10  # with the offsets it had
    assert not proxy.holding and proxy.get_timer() is None


def test_a_resume_in_time_leaves_no_timer() -> None:
    proxy, _ = proxy_with_an_offset()
    proxy.checkpoint_started(10.0)
    proxy.checkpoint_applied()
    assert proxy.get_timer() is None
