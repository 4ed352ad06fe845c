"""The peers of this end as the control plane keeps them: per peer, its
paths' states, its keying, and what the log already said of it.

A client, and a server without peers in its config, have one peer (index 0,
no name) and an engine without a fleet. A fleet server has one per
``[[peer]]`` table (multitun/peerconfig.py), each with its own key: the
engine finds a sealed datagram's peer by its key id and routes by allowed
IPs; a first message's peer is found here, by the fingerprint of the key it
claims (``for_handshake``), never by its source address. ``apply`` makes the
fleet a new set of peers, at start and on SIGHUP, without touching the peers
that stay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import wire
from ._fastpath import Engine
from .config import MAX_PEERS, Config
from .keying import Keying, fingerprint
from .logfields import event
from .pathstate import PathStates
from .peerconfig import PeerSpec

log = logging.getLogger("multitun")


@dataclass(eq=False)
class Peer:
    index: int
    # None: the only peer (a client's server, or a server's one client).
    name: str | None
    states: PathStates
    keying: Keying | None
    spec: PeerSpec | None = None
    # What the log last said: the peer's session changes (in clear), the
    # keys it confirmed (a server), and its refused handshakes.
    seen_sessions: int = 0
    seen_key_changes: int = 0
    seen_refused: int = 0
    # When it last confirmed new keys (time.monotonic()), for status.
    keys_confirmed_at: float | None = None

    def said(self, text: str) -> str:
        """A log line's text, naming the peer when there are several."""
        return f"peer {self.name}: {text}" if self.name else text

    def fields(self, name: str, **fields: object) -> dict:
        """A log line's structured fields (logfields.event), with the peer's
        name when there are several."""
        return event(name, **fields, **({"peer": self.name} if self.name else {}))


class Peers:
    """Every peer of this end, by index."""

    def __init__(self, config: Config, engine: Engine,
                 keying: Callable[..., Keying] | None) -> None:
        """``keying``: what makes a peer's keying (its role's class, with the
        server's handshake thread bound), or None in clear."""
        self.config, self.engine, self.keying = config, engine, keying
        self.fleet = bool(config.peers)
        self.by_index: dict[int, Peer] = {}
        self.by_fingerprint: dict[bytes, Peer] = {}
        # First messages whose fingerprint is no peer's key, and the last
        # sender of one, for the log.
        self.unknown_key = 0
        self.unknown_key_source: tuple | None = None
        if self.fleet:
            self.apply(config.peers)
        else:
            self.by_index[0] = Peer(0, None, PathStates(config), keying(
                engine, config.key, config.cipher) if keying and config.key else None)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self.by_index.values()))

    def __getitem__(self, index: int) -> Peer:
        return self.by_index[index]

    def named(self, name: str) -> Peer | None:
        return next((p for p in self.by_index.values() if p.name == name), None)

    def for_handshake(self, datagram: bytes, source: tuple | None) -> Peer | None:
        """The peer whose key a fleet server's first message claims (its
        fingerprint), or None: counted, and the sender kept for the log."""
        body = datagram[wire.HEADER_LEN:]
        peer = self.by_fingerprint.get(body[:wire.FINGERPRINT_LEN])
        if peer is None:
            self.unknown_key += 1
            self.unknown_key_source = source
        return peer

    def apply(self, specs: tuple[PeerSpec, ...]) -> tuple[list[str], list[str], list[str]]:
        """Make the fleet these peers (checked as a set: peerconfig.py):
        (added, removed, changed) names.

        A peer whose name and key stay keeps its session, endpoints and
        counters; a new allowed_ips takes effect at once. A peer whose key
        changed is a new peer under the same name: its old session ends.
        The engine sees it all between two runs of its loop: the routes of
        the peers that go, then those peers, leave first (their slots are
        free again), then the new peers come in, then every route."""
        old = {p.name: p for p in self.by_index.values()}
        wanted = {s.name: s for s in specs}
        gone = [p for p in old.values()
                if p.name not in wanted or wanted[p.name].key != p.spec.key]
        added, changed, new = [], [], []
        for spec in specs:
            peer = old.get(spec.name)
            if peer is not None and peer.spec == spec:
                continue
            if peer is None:
                added.append(spec.name)
            else:
                changed.append(spec.name)
            if peer is not None and peer.spec.key == spec.key:
                peer.spec = spec  # new allowed_ips, same session
            else:
                new.append(spec)
        self._route([p for p in self.by_index.values() if p not in gone])
        for peer in gone:
            peer.keying.closed = True  # a handshake still on its way installs nothing
            self.engine.remove_peer(peer.index)
            del self.by_index[peer.index]
        for spec in new:
            index = next(i for i in range(MAX_PEERS) if i not in self.by_index)
            peer = Peer(index, spec.name, PathStates(self.config), None, spec)
            peer.keying = self.keying(self.engine, spec.key, self.config.cipher, index,
                                      spec.name)
            self.engine.add_peer(index)
            self.by_index[index] = peer
        self._route(list(self.by_index.values()))
        self.by_fingerprint = {fingerprint(p.spec.key): p for p in self.by_index.values()}
        return added, [p.name for p in gone if p.name not in wanted], changed

    def _route(self, peers: list[Peer]) -> None:
        self.engine.set_routes([(p.index, net.network_address.packed, net.prefixlen)
                                for p in peers for net in p.spec.allowed_ips])
