"""Relays that stand in the network as an active adversary (or plain bad luck) would: TCP relays between the
trusted side and a worker (``Relay`` holds the plumbing; a subclass only decides what happens to each chunk), and
a gRPC man in the middle of the serving API without keys (:class:`GrpcRelay`)."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc

MODES = ("pass", "blackhole", "reset")


def _rst(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of an orderly FIN; a thread waiting on ``sock`` wakes at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)  # wakes a pump in select: the RST is only sent once no call holds the socket
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


@dataclass(eq=False)
class Link:
    """One relayed connection: the accepted ``client`` socket and its own ``server`` socket upstream."""

    client: socket.socket
    server: socket.socket


class Relay:
    """Listens on 127.0.0.1 (``address``) and relays each accepted connection over its own upstream connection to
    ``upstream`` (``host:port``), one pump thread per direction. ``connections`` counts the connections accepted.

    Hooks (called from the accept and pump threads; a subclass guards its own state with ``self._lock``):
    ``refuses()`` true resets a new connection at accept; ``holding()`` true makes the pumps read nothing (bytes
    wait in the kernel, as TCP would retransmit them); ``forward(link, chunk, from_server)`` returns the bytes to
    send on, or None to drop the chunk and reset both sockets. Either side's EOF or error closes both."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.connections = 0
        self._lock = threading.Lock()
        self._links: list[Link] = []
        self._stopped = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def refuses(self) -> bool:
        return False

    def holding(self) -> bool:
        return False

    def forward(self, link: Link, chunk: bytes, from_server: bool) -> bytes | None:
        return chunk

    def reset(self, link: Link) -> None:
        """Abort both sides of ``link`` with an RST."""
        self._forget(link)
        _rst(link.client)
        _rst(link.server)

    def reset_all(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            self.reset(link)

    def _forget(self, link: Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            if self.refuses():
                _rst(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _rst(client)
                continue
            link = Link(client, server)
            with self._lock:
                self._links.append(link)
            for src, dst, from_server in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(link, src, dst, from_server), daemon=True,
                                 name="relay-pump").start()

    def _pump(self, link: Link, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while not self._stopped:
                if self.holding():
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready or self.holding():
                    continue
                chunk = src.recv(65536)
                if not chunk:
                    return
                out = self.forward(link, chunk, from_server)
                if out is None:
                    self.reset(link)
                    return
                dst.sendall(out)
        except (OSError, ValueError):  # ValueError: select on a socket another thread closed
            return
        finally:
            self._forget(link)
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def stop(self) -> None:
        """Stop accepting and close every open connection."""
        self._stopped = True
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.client.close()
            link.server.close()

    close = stop


class TcpRelay(Relay):
    """Modes: ``pass`` forwards bytes; ``blackhole`` keeps every socket open and moves no byte either way until the
    mode changes back (a partition: the peers see silence, not an error, and a healed link delivers what waited);
    ``reset`` answers every connection, open or new, with an RST."""

    def __init__(self, upstream: str) -> None:
        self.mode = "pass"
        super().__init__(upstream)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._lock:
            self.mode = mode
        if mode == "reset":
            self.reset_all()

    def refuses(self) -> bool:
        return self.mode == "reset"

    def holding(self) -> bool:
        return self.mode != "pass"


class GrpcRelay(grpc.GenericRpcHandler):
    """A man in the middle of the serving API (no keys): each call is forwarded to ``upstream`` (``host:port``,
    switchable), its answer or status (trailing metadata included) passed back. Subclasses change what passes by
    overriding :meth:`generate` (a Generate's replies) or :meth:`unary` (any other call). ``port``: where it
    listens on 127.0.0.1."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def channel(self) -> grpc.Channel:
        with self._lock:
            if self.upstream not in self._channels:
                self._channels[self.upstream] = grpc.insecure_channel(self.upstream)
            return self._channels[self.upstream]

    @staticmethod
    def relay_error(exc: grpc.RpcError, context) -> None:
        """End ``context`` with the upstream's status and trailing metadata."""
        context.set_trailing_metadata(exc.trailing_metadata() or ())
        context.abort(exc.code(), exc.details() or "")

    def generate(self, method: str, request: bytes, meta, context):
        try:
            yield from self.channel().unary_stream(method)(request, metadata=meta, timeout=120)
        except grpc.RpcError as exc:
            self.relay_error(exc, context)

    def unary(self, method: str, request: bytes, meta, context) -> bytes:
        try:
            return self.channel().unary_unary(method)(request, metadata=meta, timeout=120)
        except grpc.RpcError as exc:
            self.relay_error(exc, context)
            raise  # (abort raised already)

    def service(self, details):
        method, meta = details.method, details.invocation_metadata
        if method.endswith("/Generate"):
            return grpc.unary_stream_rpc_method_handler(lambda request, context: self.generate(method, request, meta,
                                                                                               context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self.unary(method, request, meta, context))

    def stop(self) -> None:
        self.server.stop(grace=None)
        with self._lock:
            for ch in self._channels.values():
                ch.close()
