"""What a client and a server do differently, one class each, picked once at
start (``role_for``).

The client has one connected socket per configured path and the server's
addresses; it reconnects a path that had no route at start, and it makes the
handshakes. The server has one socket on its listening address and learns
its paths' endpoints from the client's packets (logging each one), forgets
an endpoint silent for --timeout, and answers handshakes. Everything else
about a path is the same on both ends (multitun/tunnel.py).
"""

from __future__ import annotations

import logging
import socket
import time

from ._fastpath import Engine
from .config import Config
from .keying import ClientKeying, Keying, ServerKeying
from .logfields import event, hostport
from .paths import connect_client_socket, open_client_socket, open_server_socket
from .pathstate import PathStates

log = logging.getLogger("multitun")


class ClientRole:
    name = "client"
    server = False  # for the engine: a client's paths are its sockets
    keying: type[Keying] = ClientKeying

    def __init__(self, config: Config) -> None:
        self.config = config
        self.socks: list[socket.socket] = []

    def open_sockets(self) -> list[socket.socket]:
        self.socks = [open_client_socket(path) for path in self.config.paths]
        return self.socks

    def start(self, engine: Engine) -> None:
        self.engine = engine
        for i in range(len(self.config.paths)):
            self._connect(i)

    def log_start(self) -> None:
        for i, path in enumerate(self.config.paths):
            log.info("path %d: %s port %d", i, path, self.config.port)

    def reports(self, path: dict) -> bool:
        """Whether `multitun status` lists this engine path: all of a client's."""
        return True

    def local(self, path: int) -> str:
        return hostport(*self.socks[path].getsockname()[:2])

    def on_events(self, stats: dict, paths: list[dict], states: PathStates) -> None:
        """The engine said something changed. The client logs its handshakes
        itself (keying.py) and knows its endpoints: nothing of its own."""

    def housekeeping(self, paths: list[dict], states: PathStates) -> None:
        for i, sock in enumerate(self.socks):
            if not _is_connected(sock) and self._connect(i, retry=True):
                log.info("path %d (%s): connected", i, self.config.paths[i])

    def _connect(self, i: int, retry: bool = False) -> bool:
        path, port = self.config.paths[i], self.config.port
        err = connect_client_socket(self.socks[i], path, port)
        self.engine.set_remote(i, path.remote.packed, port, err is None)
        if err is not None and not retry:
            log.warning("path %d (%s): %s; sending unconnected, will retry", i, path, err.strerror)
        return err is None


class ServerRole:
    name = "server"
    server = True  # for the engine: one socket, endpoints learned per path
    keying: type[Keying] = ServerKeying

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listening = hostport(str(config.server_listen), config.port)
        self.timeout_ns = int(config.timeout * 1e9)
        self.seen_key_changes = 0

    def open_sockets(self) -> list[socket.socket]:
        return [open_server_socket(self.config.server_listen, self.config.port)]

    def start(self, engine: Engine) -> None:
        self.engine = engine

    def log_start(self) -> None:
        log.info("listening on %s", self.listening)

    def reports(self, path: dict) -> bool:
        """Only paths with an endpoint now: a forgotten one is not a path."""
        return path["active"]

    def local(self, path: int) -> str:
        return self.listening

    def on_events(self, stats: dict, paths: list[dict], states: PathStates) -> None:
        """Log new keys the client confirmed and endpoints learned or moved."""
        if stats["key_changes"] != self.seen_key_changes:
            log.log(logging.INFO if self.seen_key_changes == 0 else logging.DEBUG,
                    "client confirmed keys %08x", stats["key_id"],
                    extra=event("keys_confirmed", key_id=f"{stats['key_id']:08x}"))
            self.seen_key_changes = stats["key_changes"]
        for p in paths:
            state = states[p["path"]]
            if p["remote"] and p["remote"] != state.logged_remote:
                log.info("path %d: peer endpoint %s", p["path"], hostport(*p["remote"]),
                         extra=event("endpoint_learned", path=p["path"],
                                     remote=hostport(*p["remote"])))
            state.logged_remote = p["remote"]

    def housekeeping(self, paths: list[dict], states: PathStates) -> None:
        """Forget endpoints silent for --timeout: the client moved or left."""
        now_ns = time.monotonic_ns()
        for p in paths:
            i = p["path"]
            if p["active"] and now_ns - p["last_rx_ns"] > self.timeout_ns:
                self.engine.forget(i)
                states[i].forget_endpoint()
                log.info("path %d: forgot %s after %gs of silence", i, hostport(*p["remote"]),
                         self.config.timeout, extra=event("endpoint_forgotten", path=i))


def role_for(config: Config) -> ClientRole | ServerRole:
    return ServerRole(config) if config.is_server else ClientRole(config)


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
