"""The heartbeat codec (coloproxy.engine.heartbeat): round trips, bad datagrams, the seal
and the replay window."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coloproxy.engine.heartbeat import (
    BadHeartbeat,
    ColoMode,
    Heartbeat,
    QemuState,
    ReplayWindow,
    decode_heartbeat,
    open_heartbeat,
    seal_heartbeat,
)
from coloproxy.errors import UsageError
from coloproxy.role import Role


def beat(role: Role, sequence: int = 1, **fields: object) -> Heartbeat:
    base = Heartbeat(
        pair="web1",
        role=role,
        boot=99,
        sequence=sequence,
        qemu=QemuState.RUNNING,
        colo=ColoMode.PRIMARY if role is Role.PRIMARY else ColoMode.SECONDARY,
        serving=role is Role.PRIMARY,
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def test_heartbeat_round_trip_and_bad_datagrams() -> None:
    heartbeat = beat(Role.SECONDARY, ready=True, colo_exit=True, leaving=True)
    assert decode_heartbeat(heartbeat.encode()) == heartbeat
    assert decode_heartbeat(b"\xff") == BadHeartbeat("not-json")
    assert decode_heartbeat(b"[1]") == BadHeartbeat("not-object")
    assert decode_heartbeat(b'{"v":1}') == BadHeartbeat("version")
    assert decode_heartbeat(b'{"v":2,"pair":"x"}') == BadHeartbeat("field")
    wrong = heartbeat.encode().replace(b'"secondary"', b'"tertiary"', 1)
    assert decode_heartbeat(wrong) == BadHeartbeat("field")
    assert decode_heartbeat(b" " * 2000) == BadHeartbeat("oversized")


@given(st.binary(max_size=300))
def test_decoding_never_raises(data: bytes) -> None:
    assert isinstance(decode_heartbeat(data), Heartbeat | BadHeartbeat)
    assert isinstance(open_heartbeat(data, KEY), Heartbeat | BadHeartbeat)


KEY = b"0123456789abcdef0123456789abcdef"


def test_a_sealed_heartbeat_opens_with_its_key_only() -> None:
    heartbeat = beat(Role.PRIMARY, 5, qemu=QemuState.EXITED)
    sealed = seal_heartbeat(heartbeat, KEY)
    assert open_heartbeat(sealed, KEY) == heartbeat
    assert open_heartbeat(sealed, KEY[::-1]) == BadHeartbeat("forged")
    # Issue 10's forgery: the plain JSON a host on the link could send.
    assert open_heartbeat(heartbeat.encode(), KEY) == BadHeartbeat("forged")
    # Any changed byte, the tag's or the body's, is a forgery.
    for index in (0, 5, 40, len(sealed) - 2):
        changed = bytearray(sealed)
        changed[index] ^= 1
        assert open_heartbeat(bytes(changed), KEY) == BadHeartbeat("forged")
    assert open_heartbeat(sealed[:30], KEY) == BadHeartbeat("forged")
    assert open_heartbeat(sealed + b" " * 1024, KEY) == BadHeartbeat("oversized")
    with pytest.raises(UsageError):
        seal_heartbeat(heartbeat, b"short")


@given(st.binary(max_size=300), st.binary(min_size=16, max_size=64))
def test_no_datagram_opens_without_the_key(data: bytes, key: bytes) -> None:
    assert open_heartbeat(data, key) == BadHeartbeat("forged") or len(data) > 1024


def test_the_replay_window_takes_each_heartbeat_once_per_path() -> None:
    window = ReplayWindow()
    assert window.fresh("replication", 100, 1)
    assert window.fresh("lan", 100, 1)  # the same heartbeat on the other path
    assert not window.fresh("replication", 100, 1)  # again: a replay
    assert window.fresh("replication", 100, 3)
    assert not window.fresh("replication", 100, 2)  # older than one heard
    assert window.fresh("replication", 200, 1)  # the sender restarted: a later boot
    assert not window.fresh("replication", 100, 50)  # its previous life, replayed
    assert window.fresh("lan", 200, 1)
