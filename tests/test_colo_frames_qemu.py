"""Our notify words and framing are byte-identical to QEMU's own colo-compare's.

QEMU's colo-compare runs alone (``-machine none``) with a ``notify_dev``: we play Xen's COLO
frame on it. Its answer to ``COLO_USERSPACE_PROXY_INIT`` must be exactly what coloproxy
sends (``proxy_init_reply``), and a divergence must make it send exactly coloproxy's
``do_checkpoint()``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coloproxy.protocol.colo_frames import (
    FrameDecoder,
    do_checkpoint,
    encode_frame,
    proxy_init_reply,
)
from craft import tcp

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
ETH = bytes.fromhex("5254000000095254000000010800")


def connect(path: Path) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            sock.settimeout(10)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def read_frame(sock: socket.socket) -> bytes:
    decoder = FrameDecoder()
    while True:
        chunk = sock.recv(4096)
        assert chunk, "QEMU closed the socket"
        decoded = decoder.feed(chunk)
        if decoded.packets:
            return encode_frame(decoded.packets[0])


@pytest.fixture
def qemu() -> Iterator[dict[str, socket.socket]]:
    assert QEMU is not None
    directory = Path(tempfile.mkdtemp(prefix="c5n-"))
    names = ("pin", "sin", "out", "notify")

    def chardev(name: str) -> str:
        return f"socket,id={name},path={directory / name},server=on,wait=off"

    argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none"]
    argv += ["-object", "iothread,id=iot0"]
    for name in names:
        argv += ["-chardev", chardev(name)]
    argv += [
        "-object",
        "colo-compare,id=cc0,primary_in=pin,secondary_in=sin,outdev=out,iothread=iot0,"
        "notify_dev=notify",
    ]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    sockets: dict[str, socket.socket] = {}
    try:
        for name in names:
            sockets[name] = connect(directory / name)
        yield sockets
    finally:
        for sock in sockets.values():
            sock.close()
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_qemu_answers_proxy_init_with_our_bytes(qemu: dict[str, socket.socket]) -> None:
    notify = qemu["notify"]
    deadline = time.monotonic() + 10
    notify.settimeout(0.2)
    while True:  # QEMU may accept before it reads: ask until it answers
        notify.sendall(encode_frame(b"COLO_USERSPACE_PROXY_INIT"))
        try:
            answer = read_frame(notify)
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "colo-compare never answered"
    assert answer == proxy_init_reply()


def test_a_divergence_makes_qemu_send_our_do_checkpoint(qemu: dict[str, socket.socket]) -> None:
    primary = ETH + tcp(1000, b"primary says this")
    secondary = ETH + tcp(1000, b"secondary differs")
    deadline = time.monotonic() + 10
    qemu["notify"].settimeout(0.3)
    while True:  # until colo-compare reads both inputs (it accepts before it listens)
        qemu["pin"].sendall(encode_frame(primary))
        qemu["sin"].sendall(encode_frame(secondary))
        try:
            request = read_frame(qemu["notify"])
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "colo-compare asked for no checkpoint"
    assert request == do_checkpoint()
