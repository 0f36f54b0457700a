"""A local stand-in for Sentry: accepts sentry-sdk envelopes over HTTP and keeps their items."""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ENVELOPE_PATH = re.compile(r"^/api/(?P<project>\d+)/envelope/?(?:\?.*)?$")


@dataclass
class SentryItem:
    """One envelope item: its type ("event", "check_in", "transaction", ...), headers and payload."""

    type: str
    headers: dict[str, Any]
    raw: bytes
    envelope_headers: dict[str, Any] = field(default_factory=dict)
    project: str = ""

    @property
    def payload(self) -> Any:
        """The payload parsed as JSON, or None when it is not JSON (attachments)."""
        try:
            return json.loads(self.raw)
        except ValueError:
            return None


def parse_envelope(body: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]]:
    """Envelope = header line, then per item a header line and a payload of `length` bytes (or one line)."""
    pos = 0

    def read_line() -> bytes:
        nonlocal pos
        end = body.find(b"\n", pos)
        end = len(body) if end < 0 else end
        line, pos = body[pos:end], end + 1
        return line

    header = json.loads(read_line() or b"{}")
    items = []
    while pos < len(body):
        line = read_line()
        if not line.strip():
            continue
        item_header = json.loads(line)
        length = item_header.get("length")
        if length is None:
            payload = read_line()
        else:
            payload = body[pos : pos + int(length)]
            pos += int(length)
            if body[pos : pos + 1] == b"\n":
                pos += 1
        items.append((item_header, payload))
    return header, items


def _decode_body(data: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "deflate":
        return zlib.decompress(data)
    if encoding == "br":
        import brotli  # only present if sentry-sdk could use it too

        return bytes(brotli.decompress(data))
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


class SentrySink:
    """Threaded HTTP server(s) on loopback (and on extra addresses via `listen_on`)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._items: list[SentryItem] = []
        self.errors: list[str] = []  # requests it could not parse
        self._cond = threading.Condition()
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self.host = host
        self.port = self._serve(host)

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.host)

    def dsn_for(self, host: str, project: int = 1) -> str:
        port = self._servers[host].server_address[1]
        return f"http://public@{host}:{port}/{project}"

    def listen_on(self, host: str) -> str:
        """Also accept envelopes on `host` (e.g. the test bridge, for workers inside namespaces); its DSN."""
        if host not in self._servers:
            self._serve(host)
        return self.dsn_for(host)

    def _serve(self, host: str) -> int:
        server = ThreadingHTTPServer((host, 0), self._handler_class())
        server.daemon_threads = True
        self._servers[host] = server
        threading.Thread(target=server.serve_forever, name=f"sentry-sink-{host}", daemon=True).start()
        return int(server.server_address[1])

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                match = _ENVELOPE_PATH.match(self.path)
                if not match:
                    self._reply(404)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    data = _decode_body(body, self.headers.get("Content-Encoding", ""))
                    sink._store(match["project"], *parse_envelope(data))
                except (ValueError, OSError, ImportError) as exc:
                    sink.errors.append(f"{self.path}: {exc!r}")
                    self._reply(400)
                    return
                self._reply(200)

            def _reply(self, status: int) -> None:
                payload = b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep pytest output clean

        return Handler

    def _store(self, project: str, header: dict[str, Any], items: list[tuple[dict[str, Any], bytes]]) -> None:
        with self._cond:
            for item_header, payload in items:
                self._items.append(SentryItem(str(item_header.get("type", "")), item_header, payload, header, project))
            self._cond.notify_all()

    def all_items(self) -> list[SentryItem]:
        with self._cond:
            return list(self._items)

    def items(self, type: str) -> list[Any]:  # noqa: A002
        """Parsed payloads of every item of one type ("check_in", "transaction", "session", ...)."""
        return [i.payload for i in self.all_items() if i.type == type]

    def events(self) -> list[dict[str, Any]]:
        """Error and message events (item type "event"), as dicts."""
        return self.items("event")

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def wait_for(self, predicate: Callable[[SentryItem], bool], timeout: float = 10) -> SentryItem:
        """The first received item for which `predicate(item)` is true; waits up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self._items:
                    if predicate(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [(i.type, _summary(i)) for i in self._items]
                    raise TimeoutError(f"no matching Sentry item within {timeout}s; received: {got}")
                self._cond.wait(left)

    def wait_for_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        """Shortcut: the first event (type "event") whose payload matches."""
        item = self.wait_for(lambda i: i.type == "event" and bool(predicate(i.payload)), timeout)
        return dict(item.payload)

    def close(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        self._servers.clear()


def _summary(item: SentryItem) -> str:
    payload = item.payload
    if not isinstance(payload, dict):
        return f"{len(item.raw)} bytes"
    for key in ("message", "monitor_slug", "transaction"):
        if payload.get(key):
            return str(payload[key])[:80]
    values = (payload.get("exception") or {}).get("values") or [{}]
    return str(values[-1].get("value", ""))[:80]
