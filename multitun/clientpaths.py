"""The client's paths as they follow its interfaces: which engine path each
``-c`` entry is now, bound to which interface and address, through which
socket.

An entry by address or by name is one path, numbered by its place in ``-c``,
that waits while its address or interface is missing. A pattern makes a path
for each matching interface that is up with an address, numbered from the
first free number, and removes it when the interface goes. When the kernel
says something changed (links.py), each path is moved to match: a new socket
when its address or interface changed (a socket is bound to both), detached
from the engine while its link is down or its interface gone (and down at
once, not after --down-after), attached again when it comes back; health
says up again at the first answered probe. The server learns a moved path
from its next valid probe, as for a NAT rebinding.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field

from ._fastpath import Engine
from .config import Config, PathSpec
from .links import Binding, Interface, LinkWatch, resolve
from .logfields import event, hostport
from .paths import connect_client_socket, open_client_socket
from .pathstate import PathStates
from .wire import MAX_PATHS

log = logging.getLogger("multitun")


@dataclass
class ClientPath:
    index: int
    spec_index: int
    spec: PathSpec
    # The interface a pattern matched (None for an address or a name).
    match: str | None = None
    binding: Binding = field(default_factory=Binding)
    sock: socket.socket | None = None
    changed_at: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        return f"path {self.index} ({self.match or self.spec.interface or self.spec.local})"

    def describe(self) -> dict:
        """What `multitun status` shows of the binding."""
        b = self.binding
        return {"interface": b.interface, "address": str(b.address) if b.address else None,
                "link": "up" if b.usable else "down" if b.address else "waiting",
                "changed_s": round(time.monotonic() - self.changed_at, 1)}


class ClientPaths:
    def __init__(self, config: Config, gro: bool, tun: str) -> None:
        self.config, self.gro = config, gro
        self.watch = LinkWatch(exclude={tun})
        self.paths: dict[int, ClientPath] = {}
        self.engine: Engine | None = None
        self.states: PathStates | None = None
        self._refused: set[str] = set()
        # Entries by address or name are paths 0.. in the order of -c, as
        # the original numbered them; patterns' paths take what is free.
        for i, spec in enumerate(config.paths):
            if not spec.is_pattern:
                self.paths[i] = ClientPath(i, i, spec)

    def open(self) -> list[int]:
        """Bind what can be bound now; the sockets' fds by path (-1: none)."""
        self._follow(self.watch.look())
        return [p.sock.fileno() if (p := self.paths.get(i)) and p.sock else -1
                for i in range(max(self.paths, default=-1) + 1)]

    def start(self, engine: Engine, states: PathStates) -> None:
        self.engine, self.states = engine, states
        for p in self.paths.values():
            if p.sock:
                self._connect(p)
            else:
                states[p.index].health.link_down(time.monotonic_ns())

    def log_start(self) -> None:
        for p in sorted(self.paths.values(), key=lambda p: p.index):
            b = p.binding
            log.info("%s: %s port %d, %s", p.label, p.spec, self.config.port,
                     f"from {b.address} on {b.interface}" if b.usable
                     else f"{b.interface}: link down" if b.address
                     else "waiting for it to appear")
        for spec in self.config.paths:
            if spec.is_pattern and not any(p.spec is spec for p in self.paths.values()):
                log.info("paths %s: no interface matches yet", spec)

    def follow(self) -> None:
        """The kernel announced a change: move the paths to match."""
        if self.watch.changed():
            self._follow(self.watch.look())

    def reconnect(self) -> None:
        """Connect the sockets that had no route to the server when made, and
        make those that could not be made (the address left again at once)."""
        for p in self.paths.values():
            if p.sock is None and p.binding.usable:
                self._bind(p)
            elif p.sock and not _is_connected(p.sock) and self._connect(p, retry=True):
                log.info("%s: connected", p.label)

    def local(self, index: int) -> str | None:
        p = self.paths.get(index)
        return hostport(*p.sock.getsockname()[:2]) if p and p.sock else None

    def close(self) -> None:
        for p in self.paths.values():
            if p.sock:
                p.sock.close()
        self.watch.close()

    # ------------------------------------------------------------ moving

    def _follow(self, found: dict[str, Interface]) -> None:
        wanted: dict[tuple[int, str | None], Binding] = {}
        for i, spec in enumerate(self.config.paths):
            for match, binding in resolve(spec, found).items():
                wanted[(i, match)] = binding
        for p in list(self.paths.values()):
            if p.match is not None and (p.spec_index, p.match) not in wanted:
                self._remove(p)
        by_key = {(p.spec_index, p.match): p for p in self.paths.values()}
        for key, binding in wanted.items():
            p = by_key.get(key)
            # A pattern's match becomes a path once it is usable, and only if
            # no other entry sends through that interface to that server.
            if p is None and key[1] is not None and binding.usable and not any(
                    q.binding.interface == key[1]
                    and q.spec.remote == self.config.paths[key[0]].remote
                    for q in self.paths.values()):
                p = self._new(*key)
            if p is not None:
                self._move(p, binding)

    def _remove(self, p: ClientPath) -> None:
        """A pattern's interface went: so does its path, counters and all."""
        if p.sock:
            self._unbind(p, forget=True)
        elif self.engine is not None:
            self.engine.detach(p.index, forget=True)
        del self.paths[p.index]
        if self.states is not None:
            self.states.pop(p.index, None)  # a path that comes later starts afresh
        log.info("%s: interface gone; path removed", p.label,
                 extra=event("path_removed", path=p.index, interface=p.match))

    def _new(self, spec_index: int, match: str) -> ClientPath | None:
        free = next((i for i in range(MAX_PATHS) if i not in self.paths), None)
        if free is None:
            if match not in self._refused:
                log.warning("interface %s matches %r, but all %d paths are taken: not used",
                            match, self.config.paths[spec_index].interface, MAX_PATHS,
                            extra=event("path_limit", interface=match))
                self._refused.add(match)
            return None
        self._refused.discard(match)
        p = self.paths[free] = ClientPath(free, spec_index, self.config.paths[spec_index], match)
        return p

    def _move(self, p: ClientPath, new: Binding) -> None:
        old = p.binding
        if new == old and (p.sock is not None) == new.usable:
            return
        what = _what_changed(old, new, p.spec.local is not None)
        if p.sock and not (new.usable and new.address == old.address and new.index == old.index):
            self._unbind(p)
        p.binding, p.changed_at = new, time.monotonic()
        if new.usable and p.sock is None:
            self._bind(p)
        if self.engine is not None and what:
            if not new.usable:
                self.states[p.index].health.link_down(time.monotonic_ns())
            log.info("%s: %s", p.label, what, extra=event(
                "path_moved", path=p.index, interface=new.interface,
                address=str(new.address) if new.address else None, usable=new.usable))

    def _bind(self, p: ClientPath) -> None:
        b = p.binding
        try:
            sock = open_client_socket(b.address, b.interface, self.gro)
        except OSError as e:
            # Gone again already, most likely: the next event says so, and
            # housekeeping tries again meanwhile (reconnect()).
            log.warning("%s: cannot bind to %s: %s", p.label, b.address, e.strerror)
            if self.states is not None:
                self.states[p.index].health.link_down(time.monotonic_ns())
            return
        if self.engine is not None:
            try:
                self.engine.attach(p.index, sock.fileno())
            except OSError as e:
                log.warning("%s: %s", p.label, e.strerror)
                sock.close()
                return
            self.states[p.index].new_network()
        p.sock = sock
        if self.engine is not None:
            self._connect(p)

    def _unbind(self, p: ClientPath, forget: bool = False) -> None:
        if self.engine is not None:
            self.engine.detach(p.index, forget)
        p.sock.close()
        p.sock = None

    def _connect(self, p: ClientPath, retry: bool = False) -> bool:
        remote, port = p.spec.remote, self.config.port
        err = connect_client_socket(p.sock, remote, port)
        self.engine.set_remote(p.index, remote.packed, port, err is None)
        if err is not None and not retry:
            log.warning("%s: %s; sending unconnected, will retry", p.label, err.strerror)
        return err is None


def _what_changed(old: Binding, new: Binding, by_address: bool) -> str:
    """The log's words for a move, as "address 192.0.2.1 -> 192.0.2.7". A
    path by address knows no interface until one holds the address."""
    said = []
    if new.index != old.index and not by_address:
        said.append("interface gone" if not new.index else
                    "interface re-created" if old.index else "interface appeared")
    if new.address != old.address:
        said.append(f"address {new.address}" if not old.address else
                    f"address {old.address} gone" if not new.address else
                    f"address {old.address} -> {new.address}")
    if new.index and new.up != old.up:
        said.append("link up" if new.up else "link down")
    if not new.usable:
        said.append("waiting for it")
    return ", ".join(said)


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
