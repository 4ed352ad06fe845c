"""Command line: the original tool's flags, verbatim, plus what users expect.

    multitun -l 10.42.42.1 -s 0.0.0.0 -p 5678
    multitun -l 10.42.42.2 -c 192.168.123.2:192.168.123.1,10.0.0.2:10.0.0.1 -p 5678

Bad input gets one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import ciphers
from ._version import __version__
from .config import (
    DEFAULT_DEV, DEFAULT_DOWN_AFTER, DEFAULT_PORT, DEFAULT_PROBE_INTERVAL,
    DEFAULT_QUEUE_TARGET_MS, DEFAULT_TIMEOUT, MAX_MTU, Config, parse_address, parse_hostport,
    parse_int, parse_paths, parse_port, parse_queue_target, parse_rate_cap, parse_tun_address,
)
from .configfile import read_toml
from .errors import ConfigError, OneLineParser, SetupError
from .keyfile import load_key
from .peerconfig import parse_peer, parse_tables

EXAMPLES = """\
other commands:
  multitun demo         a tunnel over two paths in network namespaces, measured
  multitun status       paths and counters of the instance in this namespace
  multitun genkey       print a new key for --key-file

examples:
  server, TUN 10.42.42.1/24, UDP port 5678 on every address:
    multitun -l 10.42.42.1 -s 0.0.0.0 -p 5678
  the same, sealed with a key both ends hold (copy the file to the client):
    (umask 077; multitun genkey > /etc/multitun.key)
    multitun -l 10.42.42.1 -s 0.0.0.0 --key-file /etc/multitun.key
  client with two paths (local address:server address):
    multitun -l 10.42.42.2 -c 192.168.123.2:192.168.123.1,10.0.0.2:10.0.0.1 -p 5678
  client with two modems and Wi-Fi, by interface (addresses may change):
    multitun -l 10.42.42.2 -c wwan0:203.0.113.1,wwan1:203.0.113.1,wlan0:203.0.113.1
  client with a path on every LTE modem plugged in, now or later:
    multitun -l 10.42.42.2 -c 'wwan*:203.0.113.1'
  IPv6 inside the tunnel too, and an IPv6 path:
    multitun -l 10.42.42.2 -l fd42::2/64 -c [2001:db8::2]:[2001:db8::1]
"""


def _checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e6:
        raise ConfigError(f"{text!r} must be more than 0 seconds")
    return value


def _mtu(text: str) -> int:
    return parse_int(text, 576, MAX_MTU)


def _microseconds(text: str) -> int:
    return parse_int(text, 0, 100_000)


def _listen_address(text: str) -> object:
    return parse_address(text, "server listen address")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, message, and the event's
    own fields (``extra=``) when it has them."""

    _plain = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "pid": record.process,
               "message": record.getMessage()}
        out.update((k, v) for k, v in vars(record).items() if k not in self._plain)
        return json.dumps(out)


class _Version(argparse.Action):
    """--version: the release, then the libcrypto the data plane seals with,
    whose AES-GCM speed depends on its release (packaging/libcrypto.sh). The
    data plane is imported only here: the parser itself must not need it."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0,
                         help="print the version and the libcrypto in use, then exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ._fastpath import LIBCRYPTO
        print(f"multitun {__version__}\nlibcrypto: {LIBCRYPTO}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; no side effects (the man page is generated from it)."""
    p = OneLineParser(
        prog="multitun",
        description="Multi-path duplicating tunnel. Every IP packet entering the TUN device\n"
                    "is sent over every path at once; the receiver delivers the first copy\n"
                    "and drops the rest.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_Version)
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="read settings from this TOML file; its keys are the long option "
                        "names (server_port = 5678, tun_listen_addr = [\"10.42.42.1\"], "
                        "offload = false, ...); options given here override it")
    # -l and -s/-c may come from --config, so Config.check() insists on them.
    p.add_argument("-l", "--tun_listen_addr", action="append",
                   type=_checked(parse_tun_address), metavar="ADDR[/PREFIX]",
                   help="address of the TUN device; /24 (IPv4) or /64 (IPv6) if no prefix "
                        "is given; repeat for an IPv4 and an IPv6 address")
    role = p.add_mutually_exclusive_group()
    role.add_argument("-s", "--server_listen_addr", type=_checked(_listen_address),
                      metavar="ADDR",
                      help="be the server, listening on this address (0.0.0.0 or :: for all)")
    role.add_argument("-c", "--client_endpoints", type=_checked(parse_paths),
                      metavar="LOCAL:SERVER[,...]",
                      help="be the client; one path per comma-separated pair of a local side "
                           "and the server's address (IPv6 in brackets: "
                           "[2001:db8::2]:[2001:db8::1]). The local side is an address, an "
                           "interface name (wwan0: the path uses whatever address it has, and "
                           "follows it as it changes or as the interface comes and goes), or a "
                           "pattern ('wwan*': one path per matching interface that is up with "
                           "an address, now or later)")
    p.add_argument("-p", "--server_port", type=_checked(parse_port), default=DEFAULT_PORT,
                   metavar="PORT", help=f"server UDP port (default {DEFAULT_PORT})")
    p.add_argument("-t", "--timeout", type=_checked(_seconds), default=DEFAULT_TIMEOUT,
                   metavar="SECONDS",
                   help="server: forget a client path silent this long "
                        f"(default {DEFAULT_TIMEOUT:g})")
    p.add_argument("-n", "--nonblocking", action="store_true",
                   help="accepted for compatibility; multitun never blocks on a path")
    p.add_argument("--dev", default=DEFAULT_DEV, metavar="NAME",
                   help="TUN device name; %%d picks a free number (default %(default)s)")
    p.add_argument("--key-file", type=_checked(load_key), metavar="FILE",
                   help="authenticate and encrypt every packet with the key in this file "
                        "(made by `multitun genkey`; both ends need the same one; it must "
                        "not be readable by other users); without it the tunnel is in clear")
    p.add_argument("--peer", action=_PeerAction, nargs=3,
                   metavar=("NAME", "KEY_FILE", "ALLOWED_IPS"),
                   help="server: one client of a fleet, with its own key file and the inner "
                        "addresses it may use (comma-separated prefixes, e.g. "
                        "10.42.42.7/32,fd42::7/128); repeat for each client. In the config "
                        "file: a [[peer]] table each (name, key_file, allowed_ips), re-read "
                        "on SIGHUP")
    p.add_argument("--cipher", choices=ciphers.SETTINGS, default="auto",
                   help="with --key-file, what seals the packets: auto (the default) takes "
                        "AES-256-GCM when both ends have AES instructions and "
                        "ChaCha20-Poly1305 otherwise; a cipher named here is insisted on, "
                        "and a peer insisting on the other gets nothing through")
    p.add_argument("--mtu", type=_checked(_mtu), metavar="BYTES",
                   help="TUN MTU (default: fits a 1500-byte path unfragmented: "
                        "1456 over IPv4 paths, 1436 over IPv6; 16 less with --key-file)")
    p.add_argument("--probe-interval", type=_checked(_seconds), default=DEFAULT_PROBE_INTERVAL,
                   metavar="SECONDS",
                   help=f"probe (keepalive) every path this often (default {DEFAULT_PROBE_INTERVAL:g})")
    p.add_argument("--down-after", type=_checked(_seconds), metavar="SECONDS",
                   help=f"a path is down when no probe was answered for this long "
                        f"(default {DEFAULT_DOWN_AFTER:g}, or 3 probe intervals if longer)")
    p.add_argument("--queue-target", dest="queue_target_ms", type=_checked(parse_queue_target),
                   default=DEFAULT_QUEUE_TARGET_MS, metavar="MS",
                   help=f"the queueing delay a path's bottleneck may build before the path is "
                        f"paced to what it delivers; a paced path's copy is dropped as stale "
                        f"once it would arrive four times this much later than by the "
                        f"fastest other path (default {DEFAULT_QUEUE_TARGET_MS:g})")
    p.add_argument("--rate", dest="rate_caps", action="append", type=_checked(parse_rate_cap),
                   metavar="PATH=RATE",
                   help="never send faster than RATE bit/s on path PATH (its index, as "
                        "`multitun status` shows it), e.g. 1=6M for a metered modem; "
                        "may be given for several paths")
    p.add_argument("--metrics", type=_checked(parse_hostport), metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics "
                        "(needs the 'metrics' extra: prometheus-client)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text (default) or as one JSON object each")
    p.add_argument("--low-latency", action="store_true",
                   help="trade power and throughput for round-trip time: keep this host's "
                        "idle CPUs out of sleep states while running (PM QoS, "
                        "/dev/cpu_dma_latency = 0), poll for 300 us after each packet before "
                        "sleeping, and while busy let the tasks that wait for the tunnel's CPU "
                        "run every 0.3 ms")
    p.add_argument("--busy-poll", dest="busy_poll_us", type=_checked(_microseconds),
                   metavar="USEC",
                   help="after each packet, poll this long before sleeping (default 0, or "
                        "300 with --low-latency); traffic that comes at least this often "
                        "then never waits for the engine to wake, at the cost of a busy CPU")
    p.add_argument("--no-offload", dest="offload", action="store_false",
                   help="send and receive datagrams one by one (sendmmsg/recvmmsg) "
                        "instead of UDP GSO/GRO trains")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log more (debug: every probe)")
    return p


def merge_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser,
                      argv: Sequence[str]) -> None:
    """Fill ``args`` from the TOML file ``args.config``, except what ``argv``
    gave: options on the command line win. Every value goes through the same
    checks as its option; unknown keys and bad values are ConfigErrors naming
    the file and the key."""
    path = args.config
    data = read_toml(path)
    actions = {a.dest: a for a in parser._actions
               if a.dest not in ("help", "version", "config")}
    given = _given_options(argv)
    for key, value in data.items():
        action = actions.get(key)
        if action is None:
            near = difflib.get_close_matches(key, actions, n=1)
            raise ConfigError(f"{path}: unknown key {key!r}"
                              + (f" (did you mean {near[0]!r}?)" if near else ""))
        try:
            converted = _file_value(action, value)
        except (ConfigError, argparse.ArgumentTypeError) as e:
            # A peer's error names its table already.
            raise ConfigError(f"{path}: {'' if key == 'peer' else key + ': '}{e}") from None
        if key not in given:
            setattr(args, key, converted)
            if key == "peer":
                args.peers_file = path  # SIGHUP reads them again


class _PeerAction(argparse.Action):
    """--peer NAME KEY_FILE ALLOWED_IPS, appended as a PeerSpec."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        try:
            spec = parse_peer(*values, where="--peer")
        except ConfigError as e:
            raise argparse.ArgumentError(self, str(e).removeprefix("--peer: ")) from None
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or ()), spec])


def _given_options(argv: Sequence[str]) -> set[str]:
    """The dests the command line itself set (a parse with no defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _file_value(action: argparse.Action, value: object) -> object:
    """A TOML value for ``action``, checked as the option's own text would be."""
    if action.nargs == 0 and isinstance(action.const, bool):  # store_true / store_false
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"expected a count (0, 1, 2...), got {value!r}")
        return value
    if isinstance(action, _PeerAction):  # [[peer]] tables
        return list(parse_tables(value))
    if isinstance(action, argparse._AppendAction):  # -l: one address or a list
        items = value if isinstance(value, list) else [value]
        return [action.type(_scalar(item)) for item in items]
    if action.dest == "client_endpoints" and isinstance(value, list):
        value = ",".join(_scalar(v) for v in value)  # a list of "local:server" pairs
    text = _scalar(value)
    if action.choices and text not in action.choices:
        raise ConfigError(f"expected one of {', '.join(action.choices)}, got {value!r}")
    return action.type(text) if action.type else text


def _scalar(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"expected a string or a number, got {value!r}")
    return str(value)


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        tun_addresses=tuple(args.tun_listen_addr or ()),
        port=args.server_port,
        server_listen=args.server_listen_addr,
        paths=args.client_endpoints or (),
        timeout=args.timeout,
        probe_interval=args.probe_interval,
        dev=args.dev,
        mtu=args.mtu,
        low_latency=args.low_latency,
        offload=args.offload,
        down_after=args.down_after,
        busy_poll_us=args.busy_poll_us,
        metrics=args.metrics,
        key=args.key_file,
        cipher=args.cipher,
        queue_target_ms=args.queue_target_ms,
        rate_caps=tuple(args.rate_caps or ()),
        peers=tuple(args.peer or ()),
        peers_file=getattr(args, "peers_file", None),
    ).check()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from . import demo
        return demo.main(argv[1:])
    if argv[:1] == ["status"]:
        from . import status
        return status.main(argv[1:])
    if argv[:1] == ["genkey"]:
        from . import keyfile
        return keyfile.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.config:
            merge_config_file(args, parser, argv)
        config = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else logging.Formatter(
        "%(asctime)s multitun[%(process)d] %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler])
    from .tunnel import Tunnel  # the compiled engine is only needed past this point
    try:
        return Tunnel(config).run()
    except SetupError as e:
        print(f"multitun: error: {e}", file=sys.stderr)
        return 2
