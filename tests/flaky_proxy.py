"""A TCP proxy in front of a real server that can drop every connection for a while (an object store
that is unreachable for a few seconds) or refuse one request (a write the store does not allow), for
the storage-fault tests."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time


def _close(sock: socket.socket, reset: bool = False) -> None:
    """Closes ``sock`` and wakes a thread blocked on it; ``reset``: with a TCP reset, as a crashed or
    restarting server does."""
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


_DENIED_XML = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
ACCESS_DENIED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                 % len(_DENIED_XML)) + _DENIED_XML


def _deny(client: socket.socket, request: bytes) -> None:
    """Answers ``request`` (its first bytes, read from ``client``) with S3's AccessDenied, after reading the
    rest of its body (unless the client waits for a 100 Continue to send it), so that the client reads the
    answer rather than a reset connection, which it would retry."""
    head, _, body = request.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length and not re.search(rb"(?im)^expect:\s*100-continue", head):
        left = int(length.group(1)) - len(body)
        while left > 0 and (chunk := client.recv(min(left, 65536))):
            left -= len(chunk)
    client.sendall(ACCESS_DENIED)


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port>. During an outage it resets every open
    connection and every new one (counted in ``dropped``). An outage starts with ``outage(seconds)``,
    or when a given request passes (``outage_on``): a fault in the middle of a job. ``refuse_on``
    answers one given request with AccessDenied (counted in ``refused``), which clients do not retry."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.dropped = 0
        self.outages = 0
        self.refused = 0
        self._refusal: re.Pattern | None = None
        self._down_until = 0.0
        self._trigger: tuple[re.Pattern, float] | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def outage(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds
            self.outages += 1
            self._reset_open_connections()

    def _reset_open_connections(self) -> None:  # (holding the lock)
        for sock in self._open:
            _close(sock, reset=True)
        self._open.clear()

    def outage_on(self, request: bytes, seconds: float) -> None:
        """The first request matching the regular expression ``request`` starts an outage of ``seconds``
        (and is dropped)."""
        self._trigger = (re.compile(request, re.MULTILINE), seconds)

    def refuse_on(self, request: bytes) -> None:
        """The first request matching the regular expression ``request`` is answered with AccessDenied
        instead of being forwarded."""
        self._refusal = re.compile(request, re.MULTILINE)

    def _take_refusal(self, data: bytes) -> bool:
        with self._lock:
            if self._refusal is None or not self._refusal.search(data):
                return False
            self._refusal = None
            self.refused += 1
        return True

    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def close(self) -> None:
        _close(self._listener)
        with self._lock:
            self._reset_open_connections()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self.down():
                self.dropped += 1
                _close(client, reset=True)
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _take_trigger(self, data: bytes) -> bool:
        """Starts the outage if ``data`` is the first request to match the trigger (once, whatever
        the number of connections)."""
        with self._lock:
            trigger = self._trigger
            if trigger is None or not trigger[0].search(data):
                return False
            self._trigger = None
        self.outage(trigger[1])
        return True

    def _pipe(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests and self._take_trigger(data):
                    return
                if requests and self._take_refusal(data):
                    _deny(source, data)
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            _close(source)
            _close(sink)
