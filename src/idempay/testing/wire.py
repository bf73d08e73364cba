"""A TCP proxy that counts what a client sends to PostgreSQL or Redis, and breaks the wire.

Put :class:`WireProxy` between your code and a real server to measure what an operation costs
on the wire, or to reproduce the failures that are hard to provoke otherwise::

    with WireProxy.from_url(postgres_url) as proxy:
        store = payment_store_from_url(proxy.url_for(postgres_url))
        warm_up(store)                   # connections opened, statements prepared
        proxy.reset()
        handle_one_webhook(store)
        stats = proxy.stats()            # round trips, statements, writes of that webhook

What it counts (thread-safe, over every connection through the proxy since :meth:`reset`):

- ``round_trips``: the times the client sent after the server had answered, i.e. the
  direction of the conversation turned. Messages a client pipelines before the server answers
  count once. The connection's opening exchange is counted apart, in
  ``startup_round_trips``, so that a pool opening a connection does not distort per-operation
  counts. PostgreSQL: everything up to the server's first ReadyForQuery (SSL negotiation,
  StartupMessage, authentication). Redis: the handshake commands a client sends before its
  first other command (HELLO, AUTH, CLIENT ..., SELECT, READONLY). A Terminate message (a
  PostgreSQL client closing) is not a round trip.
- ``statements``: PostgreSQL: the SQL text of every statement executed, in order: each simple
  Query message, and each Execute message of the extended protocol, with the text of the
  Parse its portal was bound from (a driver that prepares statements, as psycopg does for
  statements it runs often, sends that Parse once per connection: the proxy remembers it).
  Redis: the name of every command (its first word, upper case), in order.
- ``writes``: the statements that modify data. PostgreSQL: a statement with INSERT, UPDATE,
  DELETE, MERGE or TRUNCATE as a keyword anywhere, data-modifying CTEs included (string
  literals, quoted identifiers and comments are ignored; ``SELECT ... FOR UPDATE`` locks and is
  not a write; schema statements such as CREATE TABLE are not data writes), or a COPY FROM.
  Plain BEGIN, COMMIT and SELECT are not writes. Redis: the commands that write by definition
  (SET, DEL, HSET, EXPIRE, INCR, ...). A script (EVAL, EVALSHA, FCALL) may or may not write,
  depending on its code: scripts are listed in ``scripts`` instead, never in ``writes``.

What it breaks:

- :meth:`WireProxy.drop_reply_after`: the next statement (or Redis command) that a predicate
  accepts is forwarded, with the rest of its batch (PostgreSQL: up to and including the Sync
  or the Query), and executed by the server; the proxy reads the server's answer to it, throws
  it away and closes that connection. The client sees the connection lost, while the server
  did the work: a lost commit acknowledgement. One shot.
- :meth:`WireProxy.pause` / :meth:`WireProxy.resume`: nothing is forwarded, either way, until
  resumed; connections stay open. A hung server, or a network partition that heals.
  :meth:`WireProxy.wait_until_held` tells when a client's bytes are being held.
- :meth:`WireProxy.kill_connections`: every proxied connection closed at once, in both
  directions: a server restart or a cut cable. The proxy keeps accepting new connections.

The proxy must read the protocol, so it refuses encryption itself: it answers a PostgreSQL
SSLRequest or GSSENCRequest with ``N``, as a server without TLS does (a client requiring TLS
then fails to connect through it); a ``rediss://`` client cannot use it. It handles Redis
requests in RESP (arrays of bulk strings, as every client library sends) and inline form, and
RESP2 and RESP3 replies; a dropped reply in pub/sub mode is not supported.

Every connection is served by two threads, one per direction, with blocking sockets; nothing
waits by sleeping. :meth:`WireProxy.close` closes the listener and every connection, and joins
every thread; an error inside the proxy itself (not a connection closing) is raised there.
"""

from __future__ import annotations

import contextlib
import logging
import re
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = ["WireProxy", "WireStats", "is_sql_write"]

logger = logging.getLogger(__name__)

Protocol = Literal["postgres", "redis"]
Predicate = Callable[[str], bool]

_CHUNK: Final = 65536
_CONNECT_TIMEOUT: Final = 10.0
_PG_SSL_REQUEST: Final = 80877103
_PG_GSSENC_REQUEST: Final = 80877104
_PG_CANCEL_REQUEST: Final = 80877102
_PG_TERMINATE: Final = b"X\x00\x00\x00\x04"
# Frontend messages after which the server answers with ReadyForQuery.
_PG_SYNC_POINTS: Final = frozenset(b"SQF")
# Frontend messages whose bodies the proxy reads; the others are skipped unread.
_PG_READ: Final = frozenset(b"QPBEC")


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


_REDIS_HANDSHAKE: Final = frozenset({"HELLO", "AUTH", "CLIENT", "SELECT", "READONLY"})
_REDIS_SCRIPTS: Final = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
_REDIS_WRITES: Final = _names(
    """
    SET SETNX SETEX PSETEX GETSET GETDEL GETEX MSET MSETNX APPEND SETRANGE INCR INCRBY
    INCRBYFLOAT DECR DECRBY DEL UNLINK EXPIRE PEXPIRE EXPIREAT PEXPIREAT PERSIST RENAME
    RENAMENX MOVE COPY RESTORE HSET HSETNX HMSET HDEL HINCRBY HINCRBYFLOAT HEXPIRE HPEXPIRE
    HPERSIST LPUSH RPUSH LPUSHX RPUSHX LPOP RPOP BLPOP BRPOP LMPOP BLMPOP LSET LREM LTRIM
    LINSERT LMOVE BLMOVE RPOPLPUSH BRPOPLPUSH SADD SREM SPOP SMOVE SINTERSTORE SUNIONSTORE
    SDIFFSTORE ZADD ZREM ZINCRBY ZPOPMIN ZPOPMAX BZPOPMIN BZPOPMAX ZMPOP BZMPOP
    ZREMRANGEBYSCORE ZREMRANGEBYRANK ZREMRANGEBYLEX ZUNIONSTORE ZINTERSTORE ZDIFFSTORE
    ZRANGESTORE XADD XDEL XTRIM XACK XCLAIM XAUTOCLAIM XGROUP XSETID PFADD PFMERGE GEOADD
    SETBIT BITOP BITFIELD FLUSHDB FLUSHALL SWAPDB
    """
)

# SQL text with its literals, quoted identifiers and comments blanked out, then the phrases
# where a write keyword does not write.
_SQL_NOISE: Final = re.compile(
    r"""
      --[^\n]*                          # line comment
    | /\*.*?\*/                         # block comment (not nested: good enough here)
    | (?P<dollar>\$[A-Za-z_]?\w*\$).*?(?P=dollar)   # dollar-quoted string
    | [Ee]'(?:[^'\\]|\\.|'')*'          # escape string
    | '(?:[^']|'')*'                    # string literal
    | "(?:[^"]|"")*"                    # quoted identifier
    """,
    re.VERBOSE | re.DOTALL,
)
_SQL_NOT_A_WRITE: Final = re.compile(
    r"\bFOR\s+(?:NO\s+KEY\s+)?UPDATE\b|\bON\s+(?:UPDATE|DELETE)\b", re.IGNORECASE
)
_SQL_WRITE: Final = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE|TRUNCATE)\b", re.IGNORECASE)
_SQL_COPY_FROM: Final = re.compile(r"^\s*COPY\b.*\bFROM\b", re.IGNORECASE | re.DOTALL)
_SQL_SCHEMA: Final = re.compile(r"^\s*(?:CREATE|ALTER|DROP|COMMENT|GRANT|REVOKE)\b", re.IGNORECASE)


def is_sql_write(text: str) -> bool:
    """Whether SQL ``text`` modifies data (see the module's docstring for the rule)."""
    bare = _SQL_NOISE.sub(" ", text)
    if _SQL_SCHEMA.match(bare):
        return False
    if _SQL_COPY_FROM.match(bare):
        return True
    return _SQL_WRITE.search(_SQL_NOT_A_WRITE.sub(" ", bare)) is not None


@dataclass(frozen=True, slots=True)
class WireStats:
    """What went through a proxy since its last :meth:`WireProxy.reset` (a snapshot).

    ``statements`` are SQL texts (PostgreSQL) or command names (Redis), in the order the
    proxy saw them; ``writes`` the subset that modifies data; ``scripts`` the Redis scripts
    run (EVAL, EVALSHA, FCALL), which are not in ``writes``; ``connections`` the connections
    accepted.
    """

    round_trips: int = 0
    statements: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    scripts: tuple[str, ...] = ()
    startup_round_trips: int = 0
    connections: int = 0


# --- protocol readers ---------------------------------------------------------------------
#
# Each reader is fed the bytes of one direction of one connection, chunk by chunk, in order,
# and reports the messages that ended in each chunk with their end offset in the stream. Large
# payloads that the proxy does not need are skipped, not buffered.


@dataclass(frozen=True, slots=True)
class _Request:
    """One client message: where it ends in the stream, and what the proxy learnt from it."""

    end: int
    sync: bool = False  # the server answers it (or the batch it closes) with one reply
    statement: str | None = None
    terminate: bool = False
    handshake: bool = False


class _Reader:
    """A buffer with a stream offset, and a count of bytes to skip unread."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0]
        self.skip = 0

    def take(self, data: bytes) -> None:
        if self.skip:
            skipped = min(self.skip, len(data))
            self.skip -= skipped
            self.base += skipped
            data = data[skipped:]
        self.buf += data

    def consume(self, n: int) -> None:
        del self.buf[:n]
        self.base += n

    def skip_over(self, n: int) -> None:
        """Drop the next ``n`` bytes, whether they arrived yet or not."""
        have = min(n, len(self.buf))
        self.consume(have)
        self.skip = n - have


def _cstrings(body: bytes, count: int) -> list[str]:
    parts = body.split(b"\x00", count)
    return [p.decode("utf-8", "replace") for p in parts[:count]]


class _PgFrontend(_Reader):
    """Typed frontend messages (after the startup packet): 1-byte type, int32 length."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: dict[str, str] = {}
        self.portals: dict[str, str] = {}

    def feed(self, data: bytes) -> list[_Request]:
        self.take(data)
        found: list[_Request] = []
        while len(self.buf) >= 5:
            kind = self.buf[0]
            (length,) = struct.unpack_from("!i", self.buf, 1)
            total = 1 + length
            end = self.base + total
            if kind not in _PG_READ:
                self.skip_over(total)
                found.append(
                    _Request(end, sync=kind in _PG_SYNC_POINTS, terminate=kind == ord("X"))
                )
                continue
            if len(self.buf) < total:
                break
            body = bytes(self.buf[5:total])
            self.consume(total)
            found.append(self._message(kind, body, end))
        return found

    def _message(self, kind: int, body: bytes, end: int) -> _Request:
        match chr(kind):
            case "Q":
                return _Request(end, sync=True, statement=_cstrings(body, 1)[0])
            case "P":
                name, text = _cstrings(body, 2)
                self.prepared[name] = text
            case "B":
                portal, name = _cstrings(body, 2)
                self.portals[portal] = self.prepared.get(name, "")
            case "E":
                (portal,) = _cstrings(body, 1)
                return _Request(end, statement=self.portals.get(portal, ""))
            case _:  # "C": Close a statement or a portal
                target = self.prepared if body[:1] == b"S" else self.portals
                target.pop(_cstrings(body[1:], 1)[0], None)
        return _Request(end)


class _PgBackend(_Reader):
    """Backend messages; only their ends and the ReadyForQuery ones matter."""

    def feed(self, data: bytes) -> list[tuple[int, bool]]:
        """(end offset, is ReadyForQuery) of every message that ended in ``data``."""
        self.take(data)
        found: list[tuple[int, bool]] = []
        while len(self.buf) >= 5:
            kind = self.buf[0]
            (length,) = struct.unpack_from("!i", self.buf, 1)
            found.append((self.base + 1 + length, kind == ord("Z")))
            self.skip_over(1 + length)
        return found


class _RedisRequests(_Reader):
    """RESP requests (arrays of bulk strings) and inline commands; only names are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.args_left = 0  # bulk strings still to come in the current array
        self.name: str | None = None

    def feed(self, data: bytes) -> list[_Request]:
        self.take(data)
        found: list[_Request] = []
        while True:
            if self.skip:
                break
            line_end = self.buf.find(b"\n")
            if line_end < 0:
                break
            if self.args_left:
                size = int(self.buf[1:line_end].rstrip(b"\r"))
                payload = size + 2 if size >= 0 else 0
                if self.name is None:  # the command's name: read
                    if len(self.buf) < line_end + 1 + payload:
                        break
                    first = line_end + 1
                    self.name = bytes(self.buf[first : first + max(size, 0)]).decode(
                        "ascii", "replace"
                    )
                    self.consume(first + payload)
                    end = self.base
                else:  # its arguments: skipped unread
                    self.consume(line_end + 1)
                    end = self.base + payload
                    self.skip_over(payload)
                self.args_left -= 1
                if not self.args_left:
                    found.append(self._done(end))
                continue
            line = bytes(self.buf[:line_end]).rstrip(b"\r")
            self.consume(line_end + 1)
            if line.startswith(b"*"):
                self.args_left = max(int(line[1:]), 0)
                continue
            words = line.split()
            if words:  # an inline command
                self.name = words[0].decode("ascii", "replace")
                found.append(self._done(self.base))
        return found

    def _done(self, end: int) -> _Request:
        name = (self.name or "").upper()
        self.name = None
        return _Request(end, sync=True, statement=name, handshake=name in _REDIS_HANDSHAKE)


class _RedisReplies(_Reader):
    """RESP2 and RESP3 replies, nested; push messages and attributes are not replies."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[int] = []  # elements still expected by each open aggregate
        self.top: int = 0  # the type byte of the current top-level item
        self.bulk_pending = False  # a bulk string's bytes are being skipped

    def feed(self, data: bytes) -> list[int]:
        """The end offset of every reply that ended in ``data``."""
        self.take(data)
        ends: list[int] = []
        while True:
            if self.bulk_pending:
                if self.skip:
                    break
                self.bulk_pending = False
                self._element_done(ends)
                continue
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                break
            kind = self.buf[0]
            header = bytes(self.buf[1:line_end])
            self.consume(line_end + 2)
            if not self.stack:
                self.top = kind
            self._item(kind, header, ends)
        return ends

    def _item(self, kind: int, header: bytes, ends: list[int]) -> None:
        if kind in b"$!=":  # bulk string, blob error, verbatim string
            size = int(header)
            if size >= 0:
                self.skip_over(size + 2)
                self.bulk_pending = True
                return
        elif kind in b"*~>%|":  # array, set, push, map, attribute
            count = int(header) * (2 if kind in b"%|" else 1)
            if count > 0:
                self.stack.append(count)
                return
        # Complete already: a one-line item (+ - : _ , # ( ), a null or an empty aggregate.
        self._element_done(ends)

    def _element_done(self, ends: list[int]) -> None:
        while self.stack:
            self.stack[-1] -= 1
            if self.stack[-1] > 0:
                return
            self.stack.pop()
        # A top-level item is complete. An attribute is followed by the reply it describes; a
        # push message is out of band.
        if self.top not in b">|":
            ends.append(self.base)
        self.top = 0


# --- the proxy ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    client: socket.socket
    server: socket.socket
    protocol: Protocol
    threads: list[threading.Thread] = field(default_factory=list)
    ready: bool = False  # the opening exchange is over
    server_spoke: bool = True  # the server sent something since the client's last round trip
    aborted: bool = False
    sent_syncs: int = 0  # sync points forwarded to the server
    doom_pending: bool = False  # a drop matched; its batch's sync point is not seen yet
    doom_at: int | None = None  # the number of the sync point whose answer is thrown away
    forward_limit: int | None = None  # the client's bytes past this offset are not forwarded
    running: int = 2
    client_send: threading.Lock = field(default_factory=threading.Lock)

    def abort(self) -> None:
        self.aborted = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):  # already closed by its peer
                sock.shutdown(socket.SHUT_RDWR)


class WireProxy:
    """A counting, fault-injecting TCP proxy in front of one PostgreSQL or Redis server.

    It listens on 127.0.0.1, on a free port (:attr:`port`), from construction until
    :meth:`close`; use it as a context manager. See the module's docstring for what it counts
    and breaks.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, protocol: Protocol) -> None:
        if protocol not in ("postgres", "redis"):
            raise ValueError(f"unknown protocol {protocol!r}: 'postgres' or 'redis'")
        self.upstream = (upstream_host, upstream_port)
        self.protocol: Protocol = protocol
        self._cond = threading.Condition()
        self._closed = False
        self._paused = False
        self._held = 0
        self._drop: Predicate | None = None
        self._errors: list[BaseException] = []
        self._connections: set[_Connection] = set()
        self._reset_counts()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"wire-proxy-{self.port}-accept", daemon=True
        )
        self._acceptor.start()

    @classmethod
    def from_url(cls, url: str) -> WireProxy:
        """A proxy to the server a SQLAlchemy or psycopg PostgreSQL URL, or a redis URL, names."""
        parts = urlsplit(url)
        scheme = parts.scheme.split("+", 1)[0].lower()
        if scheme == "redis":  # not rediss: the proxy must read the protocol
            return cls(parts.hostname or "127.0.0.1", parts.port or 6379, protocol="redis")
        if scheme in ("postgresql", "postgres"):
            return cls(parts.hostname or "127.0.0.1", parts.port or 5432, protocol="postgres")
        raise ValueError(f"no wire protocol for URLs of scheme {parts.scheme!r}")

    # --- the public surface ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on, on 127.0.0.1."""
        return int(self._listener.getsockname()[1])

    def url_for(self, url: str) -> str:
        """``url`` (SQLAlchemy, libpq or redis form) with its host and port made the proxy's."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}"))

    def stats(self) -> WireStats:
        """A snapshot of the counts since the last :meth:`reset`."""
        with self._cond:
            return WireStats(
                round_trips=self._round_trips,
                statements=tuple(self._statements),
                writes=tuple(self._writes),
                scripts=tuple(self._scripts),
                startup_round_trips=self._startup_round_trips,
                connections=self._accepted,
            )

    def reset(self) -> None:
        """Zero every count (connections stay open, faults stay armed)."""
        with self._cond:
            self._reset_counts()

    @property
    def open_connections(self) -> int:
        """How many proxied connections are open now."""
        with self._cond:
            return len(self._connections)

    def drop_reply_after(self, predicate: Predicate) -> None:
        """Arm a lost reply: see the module's docstring. Replaces a drop still armed."""
        with self._cond:
            self._drop = predicate

    @property
    def drop_armed(self) -> bool:
        """Whether a :meth:`drop_reply_after` is still waiting for its statement."""
        with self._cond:
            return self._drop is not None

    def pause(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """Forward again, held bytes first."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def wait_until_held(self, count: int = 1, *, timeout: float = 10.0) -> bool:
        """Wait until ``count`` chunks of bytes (either direction) are held by :meth:`pause`;
        return False if that did not happen within ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._held >= count, timeout=timeout)

    def kill_connections(self) -> int:
        """Close every proxied connection at once; return how many there were."""
        with self._cond:
            victims = list(self._connections)
            for conn in victims:
                conn.abort()
            self._cond.notify_all()
        return len(victims)

    def close(self) -> None:
        """Close the listener and every connection, and join every thread.

        Raises:
            RuntimeError: the proxy itself failed while forwarding (a bug, or a protocol it
                could not read); the first such error is chained.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._wake_w.send(b"x")
        self._acceptor.join()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            conn.abort()
        with self._cond:
            self._cond.notify_all()
        for conn in connections:
            for thread in conn.threads:
                thread.join()
        if self._errors:
            raise RuntimeError("the wire proxy failed while forwarding") from self._errors[0]

    def __enter__(self) -> WireProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- counting -------------------------------------------------------------------------

    def _reset_counts(self) -> None:
        self._round_trips = 0
        self._startup_round_trips = 0
        self._accepted = 0
        self._statements: list[str] = []
        self._writes: list[str] = []
        self._scripts: list[str] = []

    def _record(self, conn: _Connection, requests: list[_Request], *, terminate: bool) -> None:
        """Count one chunk the client sent (the caller holds ``self._cond``)."""
        startup = not conn.ready
        if self.protocol == "redis" and startup and requests:
            # The handshake lasts until the first command that is not part of it.
            startup = all(r.handshake for r in requests)
            conn.ready = not startup
        if conn.server_spoke and not terminate:
            conn.server_spoke = False
            if startup:
                self._startup_round_trips += 1
            else:
                self._round_trips += 1
        if not startup:
            for request in requests:
                if request.statement is not None:
                    self._classify(request.statement)

    def _classify(self, text: str) -> None:
        self._statements.append(text)
        if self.protocol == "postgres":
            if is_sql_write(text):
                self._writes.append(text)
        elif text in _REDIS_SCRIPTS:
            self._scripts.append(text)
        elif text in _REDIS_WRITES:
            self._writes.append(text)

    # --- accepting ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                events = selector.select()
                if any(key.fileobj is self._wake_r for key, _ in events):
                    return
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    continue
                self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=_CONNECT_TIMEOUT)
        except OSError:
            logger.warning("the wire proxy could not reach %s:%s", *self.upstream)
            client.close()
            return
        server.settimeout(None)
        for sock in (client, server):
            # Small messages one after the other: Nagle's algorithm would hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(client, server, self.protocol)
        with self._cond:
            if self._closed:
                client.close()
                server.close()
                return
            self._connections.add(conn)
            self._accepted += 1
        conn.threads = [
            threading.Thread(target=self._run, args=(conn, up), daemon=True) for up in (True, False)
        ]
        for thread in conn.threads:
            thread.start()

    # --- forwarding -----------------------------------------------------------------------

    def _run(self, conn: _Connection, upstream: bool) -> None:
        """One direction of one connection, until either side closes or the proxy does."""
        try:
            if upstream:
                self._client_to_server(conn)
            else:
                self._server_to_client(conn)
        except OSError:
            conn.abort()  # a side closed or reset: the whole connection goes
        except Exception as error:  # noqa: BLE001 - reported by close(), never lost
            with self._cond:
                self._errors.append(error)
            conn.abort()
        finally:
            with self._cond:
                conn.running -= 1
                last = conn.running == 0
                if last:
                    self._connections.discard(conn)
                self._cond.notify_all()
            if last:
                conn.client.close()
                conn.server.close()

    def _hold(self, conn: _Connection) -> bool:
        """Wait while paused; False if the connection or the proxy closed meanwhile."""
        with self._cond:
            if self._paused and not conn.aborted and not self._closed:
                self._held += 1
                self._cond.notify_all()
                try:
                    self._cond.wait_for(lambda: not self._paused or conn.aborted or self._closed)
                finally:
                    self._held -= 1
            return not conn.aborted and not self._closed

    def _chunks(self, conn: _Connection, src: socket.socket) -> Iterator[bytes]:
        """What ``src`` sends, chunk by chunk, released only while not paused."""
        while True:
            data = src.recv(_CHUNK)
            if not data or not self._hold(conn):
                return
            yield data

    def _client_to_server(self, conn: _Connection) -> None:
        reader: _PgFrontend | _RedisRequests
        if self.protocol == "postgres":
            if not self._pg_startup(conn):
                return
            reader = _PgFrontend()
        else:
            reader = _RedisRequests()
        offset = 0
        for data in self._chunks(conn, conn.client):
            start, offset = offset, offset + len(data)
            if conn.forward_limit is None:
                self._inspect(conn, reader.feed(data), terminate=data == _PG_TERMINATE)
            limit = conn.forward_limit
            if limit is None:
                conn.server.sendall(data)
            elif limit > start:
                # The end of the batch whose answer is dropped; the server hears nothing more.
                conn.server.sendall(data[: limit - start])
        # The client closed: let the server finish, then hear the end of the stream.
        conn.server.shutdown(socket.SHUT_WR)

    def _inspect(self, conn: _Connection, requests: list[_Request], *, terminate: bool) -> None:
        """Count what the client sent; start a drop if its predicate matches."""
        drop = self._drop
        matched: _Request | None = None
        if drop is not None and not conn.doom_pending:
            for request in requests:
                text = request.statement
                if text is not None and not request.handshake and drop(text):
                    matched = request
                    break
        with self._cond:
            self._record(conn, requests, terminate=terminate)
            if matched is not None and drop is not None and self._drop is drop:
                self._drop = None  # one shot: this connection takes it
                conn.doom_pending = True
            for request in requests:
                if not request.sync:
                    continue
                conn.sent_syncs += 1
                if conn.doom_pending and (matched is None or request.end >= matched.end):
                    conn.doom_pending = False
                    conn.doom_at = conn.sent_syncs
                    conn.forward_limit = request.end
                    return

    def _pg_startup(self, conn: _Connection) -> bool:
        """Forward the startup packet, answering SSL and GSS encryption requests with N."""
        while True:
            head = self._recv_exactly(conn.client, 8)
            if head is None:
                conn.server.shutdown(socket.SHUT_WR)
                return False
            length, code = struct.unpack("!ii", head)
            rest = self._recv_exactly(conn.client, length - 8) if length > 8 else b""
            if rest is None or not self._hold(conn):
                return False
            with self._cond:
                self._startup_round_trips += 1
                conn.server_spoke = False
            if code in (_PG_SSL_REQUEST, _PG_GSSENC_REQUEST):
                with conn.client_send:
                    conn.client.sendall(b"N")
                continue
            conn.server.sendall(head + rest)
            if code == _PG_CANCEL_REQUEST:
                # Not a session: the server acts on it and closes.
                conn.server.shutdown(socket.SHUT_WR)
                return False
            return True

    @staticmethod
    def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
        data = bytearray()
        while len(data) < n:
            more = sock.recv(n - len(data))
            if not more:
                return None
            data += more
        return bytes(data)

    def _server_to_client(self, conn: _Connection) -> None:
        reader: _PgBackend | _RedisReplies
        reader = _PgBackend() if self.protocol == "postgres" else _RedisReplies()
        answered = 0  # answers to the client's sync points seen so far
        last_end = 0  # where the answer after them begins in the stream
        limit: int | None = None  # nothing past this offset reaches the client
        offset = 0
        for data in self._chunks(conn, conn.server):
            start, offset = offset, offset + len(data)
            if isinstance(reader, _PgBackend):
                ends = [end for end, ready_for_query in reader.feed(data) if ready_for_query]
            else:
                ends = reader.feed(data)
            with self._cond:
                conn.server_spoke = True
                if self.protocol == "postgres" and ends and not conn.ready:
                    # The session is open; this ReadyForQuery answers no statement.
                    conn.ready = True
                    last_end = ends.pop(0)
                doom_at = conn.doom_at
            finished = False
            for end in ends:
                if doom_at is not None and limit is None and answered == doom_at - 1:
                    limit = last_end
                answered += 1
                last_end = end
                if doom_at is not None and answered >= doom_at:
                    finished = True
                    break
            if doom_at is not None and limit is None and answered == doom_at - 1:
                limit = last_end
            with conn.client_send:
                if limit is None:
                    conn.client.sendall(data)
                elif limit > start:
                    conn.client.sendall(data[: limit - start])
            if finished:
                conn.abort()  # the answer is gone, and so is the connection
                return
        conn.client.shutdown(socket.SHUT_WR)
