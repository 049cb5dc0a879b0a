"""HTTP connections held to deadlines and sizes: what uvicorn leaves to a reverse proxy.

uvicorn (0.55, httptools) times a connection out only after a response (``timeout_keep_alive``); a
client that connects and sends nothing, or stops partway through its headers or body, is kept
forever, and headers may be of any size. Its ``limit_concurrency`` answers 503 only once a request's
headers are complete, so it does nothing against such clients either. nginx has all of these
(``client_header_timeout``, ``client_body_timeout``, ``large_client_header_buffers``,
``limit_conn``), and ``deploy/nginx.conf`` sets them; this protocol gives the bare server the same,
so that it holds without the proxy too. It is uvicorn's own httptools protocol with:

- a **header deadline**: a request's line and headers must arrive within ``header_timeout`` of the
  connection opening (or of its first byte, after a response); then 408 and the connection closes;
- a **body deadline with a minimum rate**: a body gets ``body_timeout`` plus one second per
  ``body_min_rate`` bytes received; then 408 and close;
- a **header size limit**: more than ``max_header_bytes`` before the headers end is 431, and close;
- a **connection limit**: beyond ``max_connections`` open connections, the one waiting longest for
  a request that has not sent one (never served first, then idle keep-alive ones) is closed to make
  room; if every connection is busy with a request, the new one gets 503. The server never runs out
  of descriptors, and the accept queue keeps moving, so an honest client is let in;
- **a request in hand is answered**: garbage after it on the same connection (pipelined), or a
  deadline expiring meanwhile, closes the connection only once its answer has been sent.
"""

from __future__ import annotations

import resource
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Descriptors kept for everything but connections: the database, the model's files, logs, threads.
RESERVED_DESCRIPTORS = 64
MAX_AUTO_CONNECTIONS = 4096


def _unread(transport) -> bool:
    """Whether bytes (or the peer's close) wait on the connection's socket, unread by the loop yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()  # (select.select cannot watch descriptors above 1023)
    try:
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False


def auto_max_connections() -> int:
    """As many connections as the process's descriptor limit allows, keeping some in reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = MAX_AUTO_CONNECTIONS if soft == resource.RLIM_INFINITY else soft - RESERVED_DESCRIPTORS
    return max(8, min(MAX_AUTO_CONNECTIONS, limit))


@dataclass(frozen=True)
class Guard:
    """The limits, and ``on_close(reason)`` called for each connection the server closes itself."""

    header_timeout: float = 10.0
    body_timeout: float = 10.0
    body_min_rate: float = 16384.0
    max_header_bytes: int = 16384
    max_connections: int = 1024
    on_close: Callable[[str], None] = lambda reason: None


_EMPTY_CLOSE = b"connection: close\r\ncontent-length: 0\r\n\r\n"
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def guarded(guard: Guard) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn runs (``uvicorn.Config(http=...)``), held to ``guard``."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


class GuardedProtocol(HttpToolsProtocol):
    guard: Guard = Guard()

    # phase: "head" (waiting for a request's headers), "body" (reading its body), "busy" (the
    # request is complete: being answered), "idle" (answered; keep-alive)
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer = None
        self._served = 0  # requests answered on this connection
        self._answering = 0  # complete requests whose answers are not sent yet
        self._close_after_answer = False
        self._enter("head")
        self._arm(self.guard.header_timeout, self._header_late)
        if len(self.connections) > self.guard.max_connections:
            self._make_room()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _enter(self, phase: str) -> None:
        self._phase, self._since, self._head_bytes = phase, time.monotonic(), 0

    # -- deadlines ----------------------------------------------------------------------------------
    def _arm(self, delay: float, callback) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_late(self) -> None:
        self._refuse(408, "header-timeout")

    def _body_late(self) -> None:
        allowed = self.guard.body_timeout + self._body_bytes / self.guard.body_min_rate
        left = self._since + allowed - time.monotonic()
        if left > 0:  # bytes came meanwhile: the deadline moved
            self._arm(left, self._body_late)
        else:
            self._refuse(408, "body-timeout")

    def _refuse(self, status: int, reason: str) -> None:
        """Close with a short answer, unless a request of this connection is being answered: then
        close once its answer is sent."""
        self._disarm()
        if self.transport.is_closing():
            return
        self.guard.on_close(reason)
        if self._answering:
            self._close_after_request_in_hand()
            return
        self.transport.write(b"HTTP/1.1 %d %s\r\n%s" % (status, _REASONS[status], _EMPTY_CLOSE))
        self.transport.close()

    def _close_after_request_in_hand(self) -> None:
        self._close_after_answer = True
        self.flow.pause_reading()

    # -- room for new connections -------------------------------------------------------------------
    def _make_room(self) -> None:
        waiting = [
            c for c in self.connections if c is not self and getattr(c, "_phase", None) in ("head", "idle")
        ]
        # never served and waiting for headers first, then idle keep-alive ones; longest waiting first
        for victim in sorted(waiting, key=lambda c: (c._served > 0 or c._phase == "idle", c._since)):
            if _unread(victim.transport):
                continue  # its request arrived and is about to be read (an honest client, just accepted)
            victim._disarm()
            victim.guard.on_close("evicted")
            victim.transport.close()
            return
        self._refuse(503, "over-capacity")

    # -- parsing ------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._answering:  # answer the request in hand, then close: the garbage gets no answer
                self._close_after_request_in_hand()
                return
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            self.send_400_response("Upgrades are not supported.")
            return
        if self._phase == "head" and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.guard.max_header_bytes:
                self._refuse(431, "header-too-large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != "head":  # a new request after an answer (or pipelined)
            self._enter("head")
            if self.cycle is None or self.cycle.response_complete:
                self._arm(self.guard.header_timeout, self._header_late)

    def on_headers_complete(self) -> None:
        self._enter("body")
        self._body_bytes = 0
        self._arm(self.guard.body_timeout, self._body_late)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._enter("busy")
        if not self.cycle.response_complete:  # (an early answer, e.g. 413, was sent already)
            self._answering += 1
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._served += 1
        self._answering = max(0, self._answering - 1)
        if self._close_after_answer or self._phase == "body":
            # (answered before its body was all sent, e.g. 401 or 413: the rest of it is of no use)
            self._disarm()
            self.transport.close()
            return
        if self._phase == "busy":
            self._enter("idle")
        elif self._phase == "head":  # a pipelined request began meanwhile: its deadline starts now
            self._arm(self.guard.header_timeout, self._header_late)
        super().on_response_complete()
