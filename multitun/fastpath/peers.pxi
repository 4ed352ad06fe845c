# Every peer of this end, and how a datagram or a packet finds its own. A
# client, and a server without [[peer]] tables, have one peer: everything is
# its. A fleet server (``fleet``) has one per client: a sealed datagram's key
# id finds its peer (keyindex.pxd), a packet from the TUN goes to the peer
# whose allowed IPs hold its destination, and a packet from a peer reaches
# the TUN only if they hold its source (routes.pxd). Each is one hash probe
# (per prefix length in use): nothing scans the peers.

from cpython.ref cimport PyObject


cdef bint _family_routes_to(const RouteFamily *f, int peer):
    cdef uint32_t i
    if f.slots != NULL:
        for i in range(f.mask + 1):
            if f.slots[i].peer == peer:
                return True
    return False


@cython.final
cdef class Peers:
    cdef bint fleet
    cdef Paths paths
    cdef uint32_t session
    cdef bint keyed
    cdef uint64_t flow_key
    cdef uint64_t margin_ns
    # Peer i is at[i] (NULL: no peer i), kept alive by ``objects``; the loop
    # reads at[] without the GIL.
    cdef PyObject *at[MAX_PEERS]
    cdef dict objects
    cdef RouteTable routes
    cdef KeyIndex keys

    def __cinit__(self, Paths paths, bint fleet, uint32_t session, bint keyed,
                  uint64_t flow_key, uint64_t margin_ns):
        self.paths = paths
        self.fleet = fleet
        self.session = session
        self.keyed = keyed
        self.flow_key = flow_key
        self.margin_ns = margin_ns
        self.objects = {}
        self.routes.key = int.from_bytes(os.urandom(8), "little")
        self.keys.key = int.from_bytes(os.urandom(8), "little")
        if not fleet:
            self.add(0)

    def __dealloc__(self):
        routes_free(&self.routes)
        keyindex_free(&self.keys)

    cdef inline int by_key(self, uint32_t key_id) noexcept nogil:
        """The peer a sealed datagram's key id names; -1 if none."""
        if not self.fleet:
            return 0
        return keyindex_find(&self.keys, key_id)

    cdef inline int by_destination(self, const uint8_t *p, size_t n) noexcept nogil:
        """The peer a packet from the TUN goes to; -1 if none."""
        if not self.fleet:
            return 0
        return route_of_packet(&self.routes, p, n, False)

    cdef inline bint sends_from(self, int peer, const uint8_t *p, size_t n) noexcept nogil:
        """Whether a packet from ``peer`` has a source it may send from."""
        return not self.fleet or route_of_packet(&self.routes, p, n, True) == peer

    # ------------------------------------------------ for the control plane

    cdef Peer get(self, int index):
        if not 0 <= index < MAX_PEERS or self.at[index] == NULL:
            raise ValueError(f"no peer {index}")
        return <Peer>self.at[index]

    cdef Peer add(self, int index):
        cdef Peer p
        if not 0 <= index < MAX_PEERS or self.at[index] != NULL:
            raise ValueError(f"peer {index} is taken, or not within 0..{MAX_PEERS - 1}")
        p = Peer(index, self.paths, self.session, self.keyed, self.flow_key, self.margin_ns)
        self.objects[index] = p
        self.at[index] = <PyObject *>p
        return p

    cdef Peer remove(self, int index):
        """Peer ``index`` is gone: its keys, endpoints and queues with it.
        No route may name it still: the loop would find no peer there."""
        cdef Peer p = self.get(index)
        if self._routes_to(index):
            raise ValueError(f"peer {index} still has routes: set_routes() without them first")
        self.at[index] = NULL
        del self.objects[index]
        self.index_keys()
        return p

    cdef set_routes(self, routes):
        """The allowed IPs: (peer, packed address, prefix length) each. The
        whole table is built anew and swapped in."""
        cdef RouteTable t
        cdef const uint8_t[:] a
        cdef int r
        memset(&t, 0, sizeof(RouteTable))
        t.key = self.routes.key
        routes = list(routes)
        if (routes_alloc(&t.v4, 4, len(routes)) < 0
                or routes_alloc(&t.v6, 16, len(routes)) < 0):
            routes_free(&t)
            raise MemoryError()
        try:
            for peer, address, length in routes:
                a = address
                self.get(peer)
                if not (a.shape[0] in (4, 16) and 0 <= length <= 8 * a.shape[0]):
                    raise ValueError(f"not an address and prefix length: {address!r}/{length}")
                r = route_add(&t, &a[0], length, peer, a.shape[0] == 16)
                if r != ROUTE_NONE:
                    raise ValueError(f"prefix {bytes(address).hex()}/{length} is peer {r}'s "
                                     f"already")
        except BaseException:
            routes_free(&t)
            raise
        routes_free(&self.routes)
        self.routes = t

    cdef bint _routes_to(self, int index):
        return _family_routes_to(&self.routes.v4, index) or _family_routes_to(
            &self.routes.v6, index)

    cdef index_keys(self):
        """Rebuild the key id index from every peer's key ring (after keys
        were installed or dropped)."""
        cdef KeyIndex x
        cdef Peer p
        cdef int i
        if not self.fleet:
            return
        x.key = self.keys.key
        if keyindex_alloc(&x, KEY_SLOTS * len(self.objects)) < 0:
            raise MemoryError()
        for p in self.objects.values():
            for i in range(KEY_SLOTS):
                if p.keyring.slot[i].id:
                    keyindex_add(&x, p.keyring.slot[i].id, p.index)
        keyindex_free(&self.keys)
        self.keys = x

    cdef list indices(self):
        return sorted(self.objects)
