"""The HTTP side: a threaded standard-library server, one thread per connection, keep-alive.

Every connection is tracked, so that :meth:`SimulatorHTTPServer.close_all` can cut the idle
keep-alive ones and join their threads: closing the simulator leaves no thread and no socket
behind.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from idempay.testing.simulator._api import Answer

__all__ = ["Dispatch", "SimulatorHTTPServer"]

logger = logging.getLogger(__name__)

_MAX_BODY: Final = 1 << 20
_INTERNAL_ERROR: Final = b'{"error": {"type": "api_error", "message": "Internal error."}}\n'

Dispatch = Callable[[str, str, dict[str, str], bytes], Answer]
"""(method, target, lower-cased headers, body) -> the answer."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK would add about 40 ms to every answer.
    disable_nagle_algorithm = True
    server: SimulatorHTTPServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _serve(self, method: str) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > _MAX_BODY:
            self._reply(Answer(413, b'{"error": {"type": "invalid_request_error"}}\n'))
            self.close_connection = True
            return
        body = self.rfile.read(int(length)) if int(length) else b""
        try:
            answer = self.server.dispatch(method, self.path, headers, body)
        except Exception:  # a bug of the simulator must still get an answer, as Stripe's 500
            logger.exception("the simulator failed to answer %s %s", method, self.path)
            answer = Answer(500, _INTERNAL_ERROR)
        if answer.action == "reply":
            self._reply(answer)
            return
        if answer.action == "hang":
            # Hold the request unanswered; closing the simulator ends the wait early.
            self.server.closing.wait(answer.hold_seconds)
        self._reset()

    def _reply(self, answer: Answer) -> None:
        self.send_response(answer.status)
        content_type = answer.headers.get("Content-Type", "application/json")
        for name, value in answer.headers.items():
            if name != "Content-Type":
                self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes the close send a RST: the client sees the
        # connection reset, without a byte of answer.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


class SimulatorHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its connections and can cut them all."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 resets connections when many clients connect at
    # once (a demo's worker processes starting together).
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.closing = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._tracking = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="idempay-sim-http",
            daemon=True,
        )
        with self._tracking:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._tracking:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def close_all(self, timeout: float = 5.0) -> None:
        """Cut every open connection (held ones included) and join their threads."""
        self.closing.set()
        with self._tracking:
            connections = list(self._connections.items())
        for sock, _thread in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _sock, thread in connections:
            if thread is not threading.current_thread():
                thread.join(timeout)
