"""The lab's client: HTTP requests to the guest from the client namespace, and the pages.

The demo's client runs in the client namespace: fresh HTTP connections, one request each,
no retry; a request succeeds only with status 200 and exactly the page's bytes
(:func:`attempt`). :class:`ClientLoop` asks for the deterministic pages in a loop,
:class:`EchoSession` keeps one TCP connection to the guest's echo service open across a
failover, and :func:`failover_gap` measures the gap the client saw. :func:`expected_pages`
are the pages as the PVM serves them (guest/build.sh writes them).
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass

from coloproxy.lab.qemu import repo_root
from coloproxy.lab.topology import GUEST_IPV4, Topology
from coloproxy.lab.vms import LabError

REQUEST_TIMEOUT_S = 10.0
PAGES = ("/index.html", "/big.bin")
NONDETERMINISTIC_PAGE = "/cgi-bin/clock"

# --------------------------------------------------------------------------------------------
# the guest's pages, as the PVM serves them


def big_bin() -> bytes:
    """/big.bin: 384 KiB of SHA-256 counter bytes (guest/build.sh writes the same)."""
    return b"".join(
        hashlib.sha256(b"coloproxy big.bin %d" % i).digest() for i in range(384 * 1024 // 32)
    )


def index_html() -> bytes:
    """/index.html, read from guest/build.sh's heredoc."""
    script = (repo_root() / "guest" / "build.sh").read_text()
    match = re.search(r"www/index\.html\" <<'EOF'\n(.*?)\nEOF\n", script, re.DOTALL)
    if match is None:
        raise LabError("guest/build.sh no longer writes /index.html with a heredoc")
    return (match.group(1) + "\n").encode()


def expected_pages() -> dict[str, bytes]:
    return {"/index.html": index_html(), "/big.bin": big_bin()}


# --------------------------------------------------------------------------------------------
# the client (functions run inside the client namespace)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request: when it started and ended (monotonic), and whether it succeeded."""

    path: str
    started: float
    ended: float
    ok: bool
    detail: str = ""


def http_get(
    path: str, timeout: float = REQUEST_TIMEOUT_S, *, host: str = GUEST_IPV4, port: int = 80
) -> tuple[int, bytes]:
    """GET over a fresh connection to the guest (by default the lab's); (status, body)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def attempt(path: str, expected: bytes | None, timeout: float = REQUEST_TIMEOUT_S) -> Attempt:
    """One request, no retry: ok only with status 200 and (if given) exactly ``expected``."""
    started = time.monotonic()
    try:
        status, body = http_get(path, timeout)
    except (OSError, http.client.HTTPException) as exc:
        return Attempt(path, started, time.monotonic(), False, f"{type(exc).__name__}: {exc}")
    ended = time.monotonic()
    if status != 200:
        return Attempt(path, started, ended, False, f"status {status}")
    if expected is not None and body != expected:
        return Attempt(path, started, ended, False, f"{len(body)} bytes, not the page's")
    return Attempt(path, started, ended, True)


class ClientLoop:
    """Requests the deterministic pages in a loop from the client namespace, in a thread.

    :meth:`hold` lets the request in flight finish and starts no other until :meth:`resume`:
    the demo kills a QEMU between two requests, so that the failover gap it reports is a new
    request's; the SIGKILL test kills wherever the stream is (docs/lab.md, "Known limits").
    """

    def __init__(self, topology: Topology, pages: dict[str, bytes], pause: float = 0.05) -> None:
        self.topology = topology
        self.pages = pages
        self.pause = pause
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._held = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-client", daemon=True)

    def start(self) -> ClientLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        self.topology.run_in("client", self._loop)

    def _loop(self) -> None:
        paths = list(self.pages)
        index = 0
        while not self._stop.is_set():
            if self._held.is_set():
                self._idle.set()
                self._stop.wait(0.002)
                continue
            path = paths[index % len(paths)]
            index += 1
            self.attempts.append(attempt(path, self.pages[path]))
            self._stop.wait(self.pause)

    def hold(self) -> None:
        """Return once no request is in flight; start none until :meth:`resume`."""
        self._idle.clear()
        self._held.set()
        if not self._idle.wait(REQUEST_TIMEOUT_S + 5):
            raise LabError("the client's request in flight did not end")

    def resume(self) -> None:
        self._held.clear()

    def stop(self) -> list[Attempt]:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT_S + 5)
        return list(self.attempts)


class EchoSession:
    """One long-lived TCP connection to the guest's echo service, from the client namespace:
    opened before a checkpoint, it shows a connection surviving the failover."""

    def __init__(self, topology: Topology) -> None:
        self.sock = topology.run_in(
            "client", socket.create_connection, (GUEST_IPV4, 7), REQUEST_TIMEOUT_S
        )

    def exchange(self, line: bytes) -> float:
        """Send a line, read it back; the seconds it took. LabError if it did not come back."""
        started = time.monotonic()
        try:
            self.sock.sendall(line)
            received = b""
            while len(received) < len(line):
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise LabError("the echo connection was closed")
                received += chunk
        except OSError as exc:
            raise LabError(f"the echo connection broke: {exc}") from exc
        if received != line:
            raise LabError(f"the echo connection returned {received!r}, not {line!r}")
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()


def failover_gap(attempts: list[Attempt], killed: float) -> tuple[float | None, float | None]:
    """(gap, worst latency): last success ending before ``killed`` to the first success ending
    after it, in seconds; None when there is no success on one side."""
    before = [a.ended for a in attempts if a.ok and a.ended <= killed]
    after = [a.ended for a in attempts if a.ok and a.ended > killed]
    gap = (min(after) - max(before)) if before and after else None
    around = [a.ended - a.started for a in attempts if a.ok and a.ended > killed - 1]
    return gap, (max(around) if around else None)
