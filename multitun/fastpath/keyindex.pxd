# A fleet server's index of key ids: which peer a sealed datagram's key id
# belongs to, found in one hash probe (WireGuard finds a session by its
# receiver index the same way). The id is the one in every sealed header;
# the client draws it for each handshake. The control plane rebuilds the
# index from every peer's key ring whenever keys are installed or dropped
# (Engine.install_keys, drop_keys); an entry whose keys have since rotated
# out only sends the datagram to a key ring that no longer knows the id,
# which drops it as it would any unknown id.

from libc.stdint cimport uint32_t, uint64_t, int32_t
from libc.stdlib cimport calloc, free

cdef enum:
    KEYINDEX_NONE = -1


cdef struct KeyEntry:
    uint32_t id  # 0: empty (no key has id 0)
    int32_t peer


cdef struct KeyIndex:
    uint64_t key
    KeyEntry *slots
    uint32_t mask


cdef inline uint32_t keyindex_slot(const KeyIndex *x, uint32_t id) noexcept nogil:
    # Keyed, so that a sender cannot choose ids that pile into one chain.
    return <uint32_t>(((id ^ x.key) * 0x9E3779B97F4A7C15ULL) >> 32) & x.mask


cdef inline int32_t keyindex_find(const KeyIndex *x, uint32_t id) noexcept nogil:
    """The peer whose keys have this id, or KEYINDEX_NONE."""
    cdef uint32_t i
    if x.slots == NULL or id == 0:
        return KEYINDEX_NONE
    i = keyindex_slot(x, id)
    while x.slots[i].id:
        if x.slots[i].id == id:
            return x.slots[i].peer
        i = (i + 1) & x.mask
    return KEYINDEX_NONE


cdef inline int keyindex_alloc(KeyIndex *x, uint32_t count) noexcept nogil:
    """An empty index with room for ``count`` ids; -1 if out of memory."""
    cdef uint32_t size = 16
    while size < 2 * count + 2:
        size <<= 1
    x.slots = <KeyEntry *>calloc(size, sizeof(KeyEntry))
    x.mask = size - 1
    return 0 if x.slots != NULL else -1


cdef inline void keyindex_add(KeyIndex *x, uint32_t id, int32_t peer) noexcept nogil:
    cdef uint32_t i = keyindex_slot(x, id)
    while x.slots[i].id and x.slots[i].id != id:
        i = (i + 1) & x.mask
    x.slots[i].id = id
    x.slots[i].peer = peer


cdef inline void keyindex_free(KeyIndex *x) noexcept nogil:
    free(x.slots)
    x.slots = NULL
