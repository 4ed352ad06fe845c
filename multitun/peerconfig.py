"""A fleet server's clients: the ``[[peer]]`` tables of its config file, or
``--peer NAME KEY_FILE ALLOWED_IPS`` on its command line, checked as a set.

Each peer has a name (for status, logs and metrics), a key file of its own
(the client runs with the same key) and the inner addresses it may use: the
server sends a packet to the peer whose prefixes hold its destination, and
takes a packet from a peer only from a source in them (WireGuard's
cryptokey routing). So no two peers may share a key, a name, or an address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from .configfile import read_toml
from .errors import ConfigError
from .keyfile import load_key

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Names go into log lines and metric labels: short, and nothing to escape.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TABLE_KEYS = {"name", "key_file", "allowed_ips"}


@dataclass(frozen=True)
class PeerSpec:
    name: str
    key_file: str
    allowed_ips: tuple[IPNetwork, ...]
    key: bytes = field(repr=False, compare=True, default=b"")


def parse_peer(name: object, key_file: object, allowed_ips: object, where: str) -> PeerSpec:
    """One peer, from a table's values or the option's three words;
    ``where`` says which, for the error."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: name {name!r}: 1 to 32 letters, digits, '_', '.' or '-', "
                          f"starting with a letter or digit")
    what = f"peer {name!r}"
    if not isinstance(key_file, str) or not key_file:
        raise ConfigError(f"{where}: {what}: key_file must be a file's path")
    try:
        key = load_key(Path(key_file))
    except ConfigError as e:
        raise ConfigError(f"{where}: {what}: {e}") from None
    if isinstance(allowed_ips, str):
        allowed_ips = [a for a in allowed_ips.split(",") if a.strip()]
    if not isinstance(allowed_ips, list) or not allowed_ips:
        raise ConfigError(f"{where}: {what}: allowed_ips must list at least one address or "
                          f"prefix (e.g. [\"10.42.42.7/32\"])")
    prefixes = []
    for item in allowed_ips:
        if not isinstance(item, str):
            raise ConfigError(f"{where}: {what}: allowed_ips: {item!r} is not a string")
        try:
            net = ipaddress.ip_network(item.strip())
        except ValueError as e:
            raise ConfigError(f"{where}: {what}: allowed_ips: {e}") from None
        if net not in prefixes:  # "10.42.42.7" and "10.42.42.7/32" are one
            prefixes.append(net)
    return PeerSpec(name, key_file, tuple(prefixes), key)


def parse_table(table: object, where: str) -> PeerSpec:
    """A ``[[peer]]`` table: name, key_file and allowed_ips, nothing else."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table ([[peer]]), got {table!r}")
    unknown = set(table) - _TABLE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (a peer has "
                          f"{', '.join(sorted(_TABLE_KEYS))})")
    missing = _TABLE_KEYS - set(table)
    if missing:
        raise ConfigError(f"{where}: a peer needs {', '.join(sorted(missing))}"
                          + (f" (peer {table['name']!r})" if "name" in table else ""))
    return parse_peer(table["name"], table["key_file"], table["allowed_ips"], where)


def parse_tables(tables: object) -> tuple[PeerSpec, ...]:
    """The value of the config file's ``peer`` key: its [[peer]] tables."""
    if not isinstance(tables, list):
        raise ConfigError("peer: expected [[peer]] tables")
    return tuple(parse_table(t, f"[[peer]] number {i + 1}") for i, t in enumerate(tables))


def read_peers(path: Path, limit: int) -> tuple[PeerSpec, ...]:
    """The [[peer]] tables of a config file, checked as a set (SIGHUP reads
    them again; the file's other settings need a restart)."""
    data = read_toml(path)
    try:
        peers = parse_tables(data.get("peer", []))
        check_peers(peers, limit)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return peers


def check_peers(peers: tuple[PeerSpec, ...], limit: int) -> None:
    """No two peers with one name, one key or one address; at most
    ``limit`` peers."""
    if len(peers) > limit:
        raise ConfigError(f"at most {limit} peers, got {len(peers)}")
    by_name: dict[str, PeerSpec] = {}
    by_key: dict[bytes, PeerSpec] = {}
    for p in peers:
        if p.name in by_name:
            raise ConfigError(f"peer {p.name!r} is defined twice")
        other = by_key.get(p.key)
        if other is not None:
            raise ConfigError(f"peers {other.name!r} and {p.name!r} have the same key "
                              f"({other.key_file} and {p.key_file}): each client needs its own")
        by_name[p.name], by_key[p.key] = p, p
    _check_overlaps(peers)


def _check_overlaps(peers: tuple[PeerSpec, ...]) -> None:
    # Prefixes are nested or apart: sorted by start (longest last among equal
    # starts), one overlaps an earlier one exactly when it starts before the
    # furthest end seen so far, and it then lies within the prefix that
    # reaches there.
    spans = sorted(((n.version, int(n.network_address), n.prefixlen, n, p)
                    for p in peers for n in p.allowed_ips), key=lambda s: s[:3])
    cover = None
    for version, start, _, net, peer in spans:
        if cover is not None and cover[0] == version and start <= cover[1]:
            if cover[3] is not peer:
                raise ConfigError(f"peers {cover[3].name!r} and {peer.name!r} overlap: "
                                  f"{cover[2]} and {net} (an address must have one peer)")
            continue
        cover = (version, int(net.broadcast_address), net, peer)
