"""A fleet server's lookups (multitun/fastpath/routes.pxd, keyindex.pxd),
through the data plane's own code: allowed IPs by longest prefix against
Python's ipaddress, and key ids."""

import ipaddress

from hypothesis import given, settings, strategies as st

from multitun import _testing


def reference(routes, address):
    """The longest prefix that holds ``address``: its peer, or -1."""
    best = None
    for peer, net in routes:
        if address in net and (best is None or net.prefixlen > best[1].prefixlen):
            best = (peer, net)
    return best[0] if best else -1


def lookup(routes, addresses):
    found, clashes = _testing.route_lookup(
        [(peer, net.network_address.packed, net.prefixlen) for peer, net in routes],
        [a.packed for a in addresses])
    assert clashes == [-1] * len(routes)
    return found


def test_a_table_of_hosts_and_prefixes():
    net = ipaddress.ip_network
    routes = [(0, net("10.42.42.7/32")), (1, net("10.42.42.0/24")), (2, net("10.0.0.0/8")),
              (3, net("fd42::7/128")), (4, net("fd42::/64")), (5, net("0.0.0.0/0"))]
    ip = ipaddress.ip_address
    addresses = [ip("10.42.42.7"), ip("10.42.42.8"), ip("10.1.2.3"), ip("192.0.2.1"),
                 ip("fd42::7"), ip("fd42::8"), ip("fd43::1")]
    assert lookup(routes, addresses) == [0, 1, 2, 5, 3, 4, -1]


def test_the_same_prefix_twice_names_its_first_peer():
    found, clashes = _testing.route_lookup(
        [(3, bytes([10, 1, 0, 0]), 16), (4, bytes([10, 1, 9, 9]), 16)], [bytes([10, 1, 2, 3])])
    assert clashes == [-1, 3] and found == [3]


v4 = st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False),
               st.integers(0, 2**32 - 1), st.integers(0, 32))
v6 = st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False),
               st.integers(0, 2**128 - 1), st.integers(0, 128))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(v4, v6), max_size=40, unique=True), st.integers(0, 2**32),
       st.lists(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                          st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)), max_size=20))
def test_longest_prefix_agrees_with_a_reference(nets, key, extra):
    routes = list(enumerate(nets))
    # Addresses inside each prefix (its first and last), and arbitrary ones.
    addresses = [a for _, n in routes for a in (n.network_address, n.broadcast_address)] + extra
    found, clashes = _testing.route_lookup(
        [(peer, n.network_address.packed, n.prefixlen) for peer, n in routes],
        [a.packed for a in addresses], key)
    assert clashes == [-1] * len(routes)
    assert found == [reference(routes, a) for a in addresses]


@given(st.dictionaries(st.integers(1, 2**32 - 1), st.integers(0, 1023), max_size=300),
       st.lists(st.integers(1, 2**32 - 1), max_size=50), st.integers(0, 2**64 - 1))
def test_key_ids_find_their_peer(entries, others, key):
    ids = list(entries) + others
    assert _testing.key_index(entries.items(), ids, key) == [entries.get(i, -1) for i in ids]
