"""Deterministic "guest" services for namespace tests: HTTP, TCP echo and UDP echo.

Run inside a guest namespace: ``python3 tests/guestd.py --variant primary``. Both guests run
the same program; only ``/diverge`` answers differently per variant (same length, different
bytes), which is how a test injects exactly one divergence. Every other answer is the same
byte for byte on both guests: no Date header, a fixed Server header.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import socket
import socketserver
import threading

BIG = bytes((i * 131 + 7) % 251 for i in range(1 << 20))  # 1 MiB, deterministic


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "guestd"
    sys_version = ""
    variant = "primary"

    def date_time_string(self, timestamp: float | None = None) -> str:
        return "Thu, 01 Jan 1970 00:00:00 GMT"  # the same on both guests

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/big":
            self._send(BIG)
        elif self.path == "/diverge":
            self._send(b"variant: " + self.variant.encode().ljust(16, b".") + b"\n")
        else:
            self._send(b"hello from the guest\n" * 10)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self._send(hashlib.sha256(body).hexdigest().encode() + b"\n")


class DualStackHTTP(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def tcp_echo(port: int) -> None:
    listener = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def udp_echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="primary")
    parser.add_argument("--http", type=int, default=80)
    parser.add_argument("--echo", type=int, default=7)
    args = parser.parse_args()
    Handler.variant = args.variant
    threading.Thread(target=tcp_echo, args=(args.echo,), daemon=True).start()
    threading.Thread(target=udp_echo, args=(args.echo,), daemon=True).start()
    server = DualStackHTTP(("::", args.http), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
