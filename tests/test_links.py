"""Paths that follow real interfaces (multitun/links.py, clientpaths.py):
addresses that change, interfaces deleted and re-created, links down and up,
patterns whose interfaces come and go. As root, on the namespaces bed, with a
500 packet/s numbered stream through the tunnel that must lose nothing while
the other path stays up."""

import ipaddress
import subprocess
import threading
import time

import pytest
from pyroute2 import IPRoute

from multitun.config import PathSpec
from multitun.lab import TUN_SERVER, Bed, TunnelPair, udp_stream
from multitun.lab.tunnel_pair import key_args
from multitun.links import Binding, Interface, resolve

from .conftest import requires_root
from .test_status import ask

ip = ipaddress.ip_address
# The server as the Internet sees it: one address on its loopback, reached by
# every path through a route of its own (what docs/OPERATIONS.md asks of a
# client with modems).
PUBLIC = "198.18.0.1"


# ------------------------------------------------------- resolving, no root

FOUND = {
    "lo": Interface(1, "lo", True, (ip("127.0.0.1"), ip("::1"))),
    "wwan0": Interface(5, "wwan0", True, (ip("192.0.2.7"), ip("2001:db8::7"))),
    "wwan1": Interface(6, "wwan1", False, (ip("198.51.100.7"),)),
    "wwan2": Interface(7, "wwan2", True, ()),
    "wlan0": Interface(8, "wlan0", True, (ip("2001:db8:1::8"), ip("203.0.113.8"))),
}


def test_an_address_is_bound_where_it_is():
    assert resolve(PathSpec(ip("198.51.100.7"), ip("198.51.100.1")), FOUND) == {
        None: Binding("wwan1", 6, ip("198.51.100.7"), False)}
    assert resolve(PathSpec(ip("192.0.2.99"), ip("192.0.2.1")), FOUND) == {None: Binding()}


def test_a_name_takes_the_address_of_the_servers_family():
    v4, v6 = ip("203.0.113.1"), ip("2001:db8::1")
    assert resolve(PathSpec(None, v4, "wlan0"), FOUND)[None] == Binding(
        "wlan0", 8, ip("203.0.113.8"), True)
    assert resolve(PathSpec(None, v6, "wlan0"), FOUND)[None].address == ip("2001:db8:1::8")
    assert resolve(PathSpec(None, v4, "wwan2"), FOUND)[None] == Binding("wwan2", 7, None, True)
    assert not resolve(PathSpec(None, v4, "wwan2"), FOUND)[None].usable
    assert resolve(PathSpec(None, v4, "wwan9"), FOUND) == {None: Binding()}


def test_a_pattern_stands_for_every_match():
    # Every matching interface, usable or not: a path is made of one only once
    # it is up with an address, and kept while it exists (clientpaths.py).
    paths = resolve(PathSpec(None, ip("192.0.2.1"), "wwan*"), FOUND)
    assert list(paths) == ["wwan0", "wwan1", "wwan2"]
    assert [b.usable for b in paths.values()] == [True, False, False]  # down; no address
    usable = {n for n, b in resolve(PathSpec(None, ip("2001:db8::1"), "w*"), FOUND).items()
              if b.usable}
    assert usable == {"wwan0", "wlan0"}
    assert resolve(PathSpec(None, ip("192.0.2.1"), "eth[0-9]"), FOUND) == {}


# ------------------------------------------------------- the bed, as root

def client_route(bed, p, metric):
    subprocess.run(bed.command(bed.client, [
        "ip", "route", "add", PUBLIC, "via", p.server_ip, "dev", p.client_if,
        "metric", str(metric)]), check=True)


def set_address(bed, ifname, old, new):
    with IPRoute(netns=bed.client) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        if old:
            ipr.addr("del", index=index, address=old, prefixlen=24)
        if new:
            ipr.addr("add", index=index, address=new, prefixlen=24)


class Stream:
    """A numbered stream at 500 datagrams a second through the tunnel, in
    the background; ``lost()`` waits for its end."""

    def __init__(self, bed, seconds):
        self.count, self.got = int(500 * seconds), []
        self.thread = threading.Thread(target=lambda: self.got.extend(
            udp_stream(bed, bed.client, bed.server, TUN_SERVER, rate=500, count=self.count)))
        self.thread.start()

    def lost(self):
        self.thread.join()
        return self.count - len(set(self.got))


def wait_for(bed, ns, want, timeout):
    """Seconds until status in ``ns`` satisfies ``want``, and that status."""
    start = time.monotonic()
    while True:
        st = ask(bed, ns)
        if want(st):
            return time.monotonic() - start, st
        assert time.monotonic() - start < timeout, f"not within {timeout}s: {st['paths']}"
        time.sleep(0.02)


def path(st, name):
    return next((p for p in st["paths"] if p["name"] == name), None)


def both_up(st):
    return [p["state"] for p in st["paths"]] == ["up", "up"]


@pytest.fixture
def bed():
    with Bed(2) as b:
        yield b


def start(bed, tmp_path, endpoints, sealed=False):
    extra = key_args(tmp_path) if sealed else ()
    pair = TunnelPair(bed, tmp_path, endpoints=endpoints, server_extra=extra, client_extra=extra)
    pair.__enter__()
    pair.wait_carrying()
    wait_for(bed, bed.client, both_up, 5)
    return pair


BY_NAME = "c0:192.0.2.1,c1:198.51.100.1"


def path0(want):
    """A status condition on path 0: ``want(path)``."""
    return lambda st: want(path(st, "path0"))


def break_and_mend(pair, breaking, gone, mending, back, gone_within=1.0):
    """With a 500/s stream through the tunnel: break path 0 until status says
    ``gone`` (within ``gone_within`` s), mend it; until status says ``back``
    must take under a second, and the stream must lose nothing."""
    bed = pair.bed
    stream = Stream(bed, 4)
    time.sleep(1)
    breaking()
    if gone is not None:
        took, _ = wait_for(bed, bed.client, path0(gone), 1)
        print(f"\ngone after {took * 1e3:.0f} ms", end="")
        assert took < gone_within
        time.sleep(0.5)
    mending()
    took, st = wait_for(bed, bed.client, path0(back), 3)
    lost = stream.lost()
    print(f"; back after {took * 1e3:.0f} ms; {lost} of {stream.count} lost", end="")
    assert took < 1.0
    assert lost == 0
    return st


@pytest.mark.netns
@requires_root
@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_address_change(bed, tmp_path, sealed):
    pair = start(bed, tmp_path, BY_NAME, sealed)
    try:
        st = break_and_mend(pair, lambda: None, None,
                            lambda: set_address(bed, "c0", "192.0.2.2", "192.0.2.7"),
                            lambda p: p["state"] == "up" and p["address"] == "192.0.2.7")
        assert path(st, "path0")["local"].startswith("192.0.2.7:")
        wait_for(bed, bed.server, lambda st: (path(st, "path0") or {}).get(
            "remote", "").startswith("192.0.2.7:"), 1)
        # One line when the kernel's two events come together, else two.
        logs = pair.wait_log("client", "path 0 (c0): address 192.0.2.2 ")
        assert ("path 0 (c0): address 192.0.2.2 -> 192.0.2.7" in logs
                or "path 0 (c0): address 192.0.2.7" in logs), logs
        pair.wait_log("server", "path 0: peer endpoint 192.0.2.7:")
    finally:
        pair.stop()


@pytest.mark.netns
@requires_root
@pytest.mark.parametrize("address", ["192.0.2.2", "192.0.2.9"], ids=["same", "new"])
def test_interface_deleted_and_recreated(bed, tmp_path, address):
    pair = start(bed, tmp_path, BY_NAME)
    try:
        break_and_mend(pair, lambda: bed.unplug(0), lambda p: p["link"] == "waiting",
                       lambda: bed.plug(0, client_ip=address),  # a new ifindex, its address
                       lambda p: p["state"] == "up" and p["address"] == address)
        pair.wait_log("client", "path 0 (c0): interface gone")
        pair.wait_log("client", "path 0 (c0): interface appeared")
    finally:
        pair.stop()


@pytest.mark.netns
@requires_root
def test_link_down_is_down_at_once_and_up_again(bed, tmp_path):
    pair = start(bed, tmp_path, BY_NAME)
    try:
        # Down within 0.1 s: no waiting for probes to go unanswered (0.5 s).
        break_and_mend(pair, lambda: bed.set_link(bed.client, "c0", False),
                       lambda p: p["state"] == "down" and p["link"] == "down",
                       lambda: bed.set_link(bed.client, "c0", True),
                       lambda p: p["state"] == "up", gone_within=0.1)
        pair.wait_log("client", "path 0 (c0): link down")
        pair.wait_log("client", "path 0 (c0): link up")
    finally:
        pair.stop()


@pytest.mark.netns
@requires_root
def test_address_pair_whose_address_goes_and_comes_back(bed, tmp_path):
    pair = start(bed, tmp_path, bed.client_endpoints())
    try:
        break_and_mend(pair, lambda: set_address(bed, "c0", "192.0.2.2", None),
                       lambda p: p["link"] == "waiting",
                       lambda: set_address(bed, "c0", None, "192.0.2.2"),
                       lambda p: p["state"] == "up")
        pair.wait_log("client", "path 0 (192.0.2.2): address 192.0.2.2 gone, waiting for it")
    finally:
        pair.stop()


@pytest.mark.netns
@requires_root
def test_a_pattern_takes_interfaces_as_they_come_and_go(tmp_path):
    with Bed(1) as bed:
        subprocess.run(bed.command(bed.server, ["ip", "addr", "add", f"{PUBLIC}/32", "dev", "lo"]),
                       check=True)
        client_route(bed, bed.paths[0], 10)
        pair = TunnelPair(bed, tmp_path, endpoints=f"c*:{PUBLIC}")
        with pair:
            pair.wait_carrying()
            wait_for(bed, bed.client, lambda st: [p["state"] for p in st["paths"]] == ["up"], 5)
            stream = Stream(bed, 5)
            time.sleep(1)
            p1 = bed.plug(1)
            client_route(bed, p1, 20)
            took, _ = wait_for(bed, bed.client, lambda st: (path(st, "path1") or {}).get(
                "state") == "up", 3)
            print(f"\nsecond interface's path up after {took * 1e3:.0f} ms", end="")
            assert took < 1.0
            _, st = wait_for(bed, bed.server, lambda st: (path(st, "path1") or {}).get(
                "rx_packets", 0) > 50, 2)  # it carries the stream too
            assert path(st, "path1")["remote"].startswith(p1.client_ip + ":")
            # Its link going down keeps the path (a flap is not a removal).
            bed.set_link(bed.client, "c1", False)
            wait_for(bed, bed.client, lambda st: (path(st, "path1") or {}).get("link") == "down", 1)
            bed.set_link(bed.client, "c1", True)
            wait_for(bed, bed.client, lambda st: (path(st, "path1") or {}).get("state") == "up", 3)
            time.sleep(0.5)
            bed.unplug(1)
            wait_for(bed, bed.client, lambda st: path(st, "path1") is None, 1)
            assert stream.lost() == 0
            pair.wait_log("client", "path 1 (c1): interface appeared")
            pair.wait_log("client", "path 1 (c1): interface gone; path removed")


@pytest.mark.netns
@requires_root
def test_what_is_missing_at_start_is_waited_for(bed, tmp_path):
    # A modem that comes later, and an address no interface holds yet: not
    # errors; the paths wait, and the others carry the tunnel.
    pair = TunnelPair(bed, tmp_path, endpoints="c0:192.0.2.1,wwan7:192.0.2.1,"
                                                "203.0.113.77:192.0.2.1")
    with pair:
        pair.wait_carrying()
        _, st = wait_for(bed, bed.client, lambda st: path(st, "path0")["state"] == "up", 5)
        assert [path(st, f"path{i}")["link"] for i in (1, 2)] == ["waiting", "waiting"]
        logs = pair.wait_log("client", "path 1 (wwan7): wwan7 -> 192.0.2.1 port 5678, waiting")
        assert "path 2 (203.0.113.77): 203.0.113.77 -> 192.0.2.1 port 5678, waiting" in logs
        assert pair.client.poll() is None
