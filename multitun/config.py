"""What a tunnel end is asked to be, checked before anything is created.

Parsing functions raise ConfigError with a message that names the bad value;
the CLI turns it into one line on stderr and exit status 2.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from pathlib import Path

from . import wire
from .capacity import MIN_RATE
from .errors import ConfigError
from .peerconfig import PeerSpec, check_peers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_PORT = 5678
DEFAULT_TIMEOUT = 20.0
DEFAULT_PROBE_INTERVAL = 0.1
DEFAULT_DOWN_AFTER = 0.5
# --queue-target: the queueing delay a paced path's bottleneck may hold
# (multitun/capacity.py). A paced path's queued copy is stale once it would
# arrive this many targets later than by the fastest other path: late enough
# to be of no use to real-time traffic, while a copy that lost only the
# paths' difference in delay still covers for a loss on the faster path.
DEFAULT_QUEUE_TARGET_MS = 15.0
STALE_MARGIN_TARGETS = 4
MAX_QUEUE_TARGET_MS = 1000.0
# --rate: no cap below the floor the pacing itself keeps (capacity.MIN_RATE,
# bytes/s), in bit/s.
MIN_RATE_CAP = MIN_RATE * 8
# --low-latency polls this long after each packet unless --busy-poll says
# otherwise (measured on the two-path bed: about 5 us off the median round
# trip, on top of PM QoS, at 1 ms between packets).
LOW_LATENCY_BUSY_POLL_US = 300
DEFAULT_DEV = "multitun%d"
# The path MTU multitun plans for when --mtu is not given: Ethernet's.
PATH_MTU = 1500
UDP_HEADER = 8
IP_HEADER = {4: 20, 6: 40}
MIN_MTU = {4: 576, 6: 1280}  # RFC 791 / RFC 8200 minimum link MTUs
# The largest --mtu in clear: its packet and our header fill a UDP datagram.
# Sealed, the tag must fit too (Config.check).
MAX_MTU = wire.MAX_DATAGRAM - wire.HEADER_LEN
# Clients one server carries ([[peer]] tables); the engine's own limit
# (_fastpath.LIMITS, which tests/test_codec.py holds equal).
MAX_PEERS = 1024


# What the kernel takes as an interface name (net/core/dev.c, dev_valid_name()):
# 1 to IFNAMSIZ - 1 bytes, no '/', ':' or white space, not '.' or '..'.
IFNAMSIZ = 16
PATTERN_CHARS = "*?["


@dataclass(frozen=True)
class PathSpec:
    """One client path: where to send from, and the server's address. The
    local side is an address (as the original's ``-c``), an interface name
    (the path uses whatever address it has), or a pattern (fnmatch(3)): one
    path per matching interface, as they come and go."""

    local: IPAddress | None
    remote: IPAddress
    interface: str | None = None

    @property
    def is_pattern(self) -> bool:
        return self.interface is not None and any(c in self.interface for c in PATTERN_CHARS)

    def __str__(self) -> str:
        return f"{self.interface if self.local is None else self.local} -> {self.remote}"


@dataclass(frozen=True)
class Config:
    tun_addresses: tuple[IPInterface, ...]
    port: int
    server_listen: IPAddress | None = None
    paths: tuple[PathSpec, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    dev: str = DEFAULT_DEV
    mtu: int | None = None
    low_latency: bool = False
    offload: bool = True
    down_after: float | None = None
    busy_poll_us: int | None = None
    metrics: tuple[str, int] | None = None
    # The pre-shared key (--key-file): None runs version 1, in clear.
    key: bytes | None = field(default=None, repr=False)
    # --cipher: "auto" or a cipher's name (multitun/ciphers.py).
    cipher: str = "auto"
    queue_target_ms: float = DEFAULT_QUEUE_TARGET_MS
    # --rate: (path index, bit/s) caps.
    rate_caps: tuple[tuple[int, int], ...] = ()
    # A fleet server's clients ([[peer]] tables or --peer), each with its own
    # key; the file they came from, read again on SIGHUP (None: they came
    # from the command line, or there are none).
    peers: tuple[PeerSpec, ...] = ()
    peers_file: Path | None = None

    @property
    def is_server(self) -> bool:
        return self.server_listen is not None

    @property
    def keyed(self) -> bool:
        """Sealed (version 2): a key file, or a fleet (a key per peer)."""
        return self.key is not None or bool(self.peers)

    @property
    def outer_families(self) -> set[int]:
        """IP versions the tunnel's own datagrams travel in."""
        if self.server_listen is not None:
            return {self.server_listen.version}
        return {p.remote.version for p in self.paths}

    @property
    def effective_mtu(self) -> int:
        """--mtu, or the largest TUN MTU whose datagrams fit a 1500-byte path
        unfragmented: 1500 - IP header (20, or 40 if any path is IPv6) - UDP 8 -
        multitun header 16 = 1456 (1436); 16 less with a key, for the
        authentication tag: 1440 (1420)."""
        if self.mtu is not None:
            return self.mtu
        ip = max(IP_HEADER[v] for v in self.outer_families)
        tag = wire.TAG_LEN if self.keyed else 0
        return PATH_MTU - ip - UDP_HEADER - wire.HEADER_LEN - tag

    @property
    def effective_busy_poll_us(self) -> int:
        """--busy-poll, or 300 us with --low-latency (0 without)."""
        if self.busy_poll_us is not None:
            return self.busy_poll_us
        return LOW_LATENCY_BUSY_POLL_US if self.low_latency else 0

    @property
    def effective_down_after(self) -> float:
        """--down-after, or 0.5 s (three probe intervals if that is longer)."""
        if self.down_after is not None:
            return self.down_after
        return max(DEFAULT_DOWN_AFTER, 3 * self.probe_interval)

    @property
    def stale_margin_ms(self) -> float:
        return STALE_MARGIN_TARGETS * self.queue_target_ms

    def check(self) -> Config:
        if self.server_listen is not None and self.paths:
            raise ConfigError("give either -s (server) or -c (client), not both")
        if self.server_listen is None and not self.paths:
            raise ConfigError("give -s/--server_listen_addr (server) or "
                              "-c/--client_endpoints (client)")
        if len(self.paths) > wire.MAX_PATHS:
            raise ConfigError(f"at most {wire.MAX_PATHS} paths, got {len(self.paths)}")
        if not self.tun_addresses:
            raise ConfigError("-l/--tun_listen_addr is required")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout:g}")
        if self.probe_interval <= 0:
            raise ConfigError(f"probe interval must be positive, got {self.probe_interval:g}")
        if self.probe_interval >= self.timeout:
            raise ConfigError("probe interval must be shorter than the timeout")
        if self.down_after is not None and self.down_after <= self.probe_interval:
            raise ConfigError("--down-after must be longer than the probe interval")
        if self.cipher != "auto" and not self.keyed:
            raise ConfigError(f"--cipher {self.cipher} needs --key-file: without a key "
                              f"nothing is sealed")
        if self.peers:
            if not self.is_server:
                raise ConfigError("peers ([[peer]] or --peer) are a server's; a client has "
                                  "one server, and --key-file")
            if self.key is not None:
                raise ConfigError("give --key-file (one client) or peers ([[peer]] or "
                                  "--peer, each with its own key), not both")
            check_peers(self.peers, MAX_PEERS)
        capped = [path for path, _ in self.rate_caps]
        for path in capped:
            if capped.count(path) > 1:
                raise ConfigError(f"--rate: path {path} is given more than one rate")
        mtu = self.effective_mtu
        if self.keyed and mtu + wire.HEADER_LEN + wire.TAG_LEN > wire.MAX_DATAGRAM:
            raise ConfigError(
                f"--mtu {mtu} is too large with --key-file: with the header and the "
                f"authentication tag a packet would not fit a UDP datagram "
                f"(at most {wire.MAX_DATAGRAM - wire.HEADER_LEN - wire.TAG_LEN})")
        for addr in self.tun_addresses:
            if mtu < MIN_MTU[addr.version]:
                raise ConfigError(
                    f"MTU {mtu} is below IPv{addr.version}'s minimum of "
                    f"{MIN_MTU[addr.version]} (for {addr})")
        return self


def parse_address(text: str, what: str) -> IPAddress:
    """An IPv4 or IPv6 address; IPv6 may be in brackets."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an IP address") from None


def parse_tun_address(text: str) -> IPInterface:
    """``10.42.42.1`` (a /24, as the original), ``10.42.42.1/30`` or ``fd42::1/64``."""
    addr, slash, prefix = text.partition("/")
    ip = parse_address(addr, "tun address")
    if not slash:
        prefix = "24" if ip.version == 4 else "64"
    try:
        iface = ipaddress.ip_interface(f"{ip}/{prefix}")
    except ValueError:
        raise ConfigError(f"tun address: bad prefix length in {text!r}") from None
    if iface.version == 4 and iface.network.prefixlen < 31 \
            and iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ConfigError(f"tun address: {text!r} is the network's own or broadcast address")
    return iface


def parse_int(text: str, low: int, high: int, what: str = "") -> int:
    """A decimal integer within low..high; ``what`` prefixes the error."""
    prefix = f"{what}: " if what else ""
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError(f"{prefix}{text!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{prefix}{value} is out of range {low}-{high}")
    return value


def parse_port(text: str) -> int:
    return parse_int(text, 1, 65535, "port")


def parse_queue_target(text: str) -> float:
    """Milliseconds, more than 0 and at most MAX_QUEUE_TARGET_MS."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"queue target: {text!r} is not a number of milliseconds") from None
    if not 0 < value <= MAX_QUEUE_TARGET_MS:
        raise ConfigError(f"queue target: {text!r} must be more than 0 and at most "
                          f"{MAX_QUEUE_TARGET_MS:g} ms")
    return value


_RATE_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_rate_cap(text: str) -> tuple[int, int]:
    """``PATH=RATE``: path index (as `multitun status` numbers them) and bit/s,
    with an optional k, M or G (``1=6M``, ``0=500k``)."""
    path, eq, rate = text.partition("=")
    if not eq:
        raise ConfigError(f"rate: {text!r}: expected PATH=RATE (e.g. 1=6M)")
    index = parse_int(path.strip(), 0, wire.MAX_PATHS - 1, f"rate {text!r}: path")
    rate = rate.strip()
    unit = rate[-1:].lower() if rate[-1:].isalpha() else ""
    try:
        bits = float(rate[:len(rate) - len(unit)]) * _RATE_UNITS[unit]
    except (KeyError, ValueError):
        raise ConfigError(f"rate {text!r}: {rate!r} is not a rate in bit/s "
                          f"(a number, optionally with k, M or G)") from None
    if not MIN_RATE_CAP <= bits < 1e12:
        raise ConfigError(f"rate {text!r}: must be at least {MIN_RATE_CAP // 1000} kbit/s "
                          f"and below 1 Tbit/s")
    return index, int(bits)


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for a listening socket; IPv6 in brackets: ``[::1]:9100``."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ConfigError(f"{text!r}: expected HOST:PORT (e.g. 127.0.0.1:9100)")
    return str(parse_address(host, "metrics address")), parse_port(port)


def parse_paths(text: str) -> tuple[PathSpec, ...]:
    """``local:server,local:server``. The local side is an address (IPv6 in
    brackets: ``[2001:db8::2]:[2001:db8::1]``), an interface name
    (``wwan0:203.0.113.1``) or a pattern of names (``'wwan*:203.0.113.1'``)."""
    paths = []
    for item in text.split(","):
        local, remote = _split_pair(item.strip())
        try:
            address, interface = parse_address(local, ""), None
        except ConfigError:
            address, interface = None, parse_interface(local, f"path {item!r}")
        spec = PathSpec(address, parse_address(remote, f"path {item!r}"), interface)
        if spec.local is not None and spec.local.version == 6 and spec.local.is_link_local:
            raise ConfigError(f"path {item!r}: a link-local address holds no route to a "
                              f"server; give its interface's name instead")
        if spec.local is not None and spec.local.version != spec.remote.version:
            raise ConfigError(f"path {item!r}: local and server address are not both IPv4 or IPv6")
        if spec in paths:
            raise ConfigError(f"path {item!r} is given twice")
        paths.append(spec)
    return tuple(paths)


def parse_interface(text: str, what: str) -> str:
    """An interface name, or an fnmatch(3) pattern of names (``wwan*``)."""
    if text.startswith("[") or all(c.isdigit() or c == "." for c in text):
        raise ConfigError(f"{what}: {text!r} is not an IP address")  # meant as one
    if not 0 < len(text.encode()) < IFNAMSIZ or text in (".", "..") \
            or any(c == "/" or c.isspace() for c in text):
        raise ConfigError(f"{what}: {text!r} is neither an IP address nor an interface name "
                          f"(1 to {IFNAMSIZ - 1} bytes, no '/' or spaces)")
    if "[" in text and "]" not in text[text.index("["):]:
        raise ConfigError(f"{what}: pattern {text!r} has a '[' that is never closed")
    return text


def _split_pair(item: str) -> tuple[str, str]:
    if item.startswith("["):
        end = item.find("]")
        if end < 0 or item[end + 1:end + 2] != ":":
            raise ConfigError(f"path {item!r}: expected [local]:[server]")
        return item[:end + 1], item[end + 2:]
    local, colon, remote = item.partition(":")
    if not colon or not local or not remote:
        raise ConfigError(f"path {item!r}: expected local:server (e.g. 192.0.2.2:192.0.2.1)")
    return local, remote
