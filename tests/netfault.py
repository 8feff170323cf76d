"""A TCP relay that a test can switch between forwarding, a partition and resetting connections: the network
between the trusted side and a worker, as an active adversary (or plain bad luck) would make it."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

MODES = ("pass", "blackhole", "reset")


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class TcpRelay:
    """Listens on 127.0.0.1 (``address``) and relays each connection to ``upstream`` (``host:port``).

    Modes: ``pass`` forwards bytes; ``blackhole`` keeps every socket open and moves no byte either way until the
    mode changes back (a partition: the peers see silence, not an error, and a healed link delivers what waited);
    ``reset`` answers every connection, open or new, with an RST.
    ``connections`` counts the connections accepted."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.mode = "pass"
        self.connections = 0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True, name="tcp-relay").start()

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._lock:
            self.mode = mode
            pairs = list(self._pairs) if mode == "reset" else []
            if mode == "reset":
                self._pairs.clear()
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                mode = self.mode
            if mode == "reset":
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True, name="tcp-relay-pump").start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self._stopped:
                if self.mode != "pass":  # blackhole: nothing moves (bytes wait in the kernel, as TCP would retransmit)
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        with self._lock:
            pairs, self._pairs = list(self._pairs), []
        for a, b in pairs:
            a.close()
            b.close()
