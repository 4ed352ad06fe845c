# The packets for the TUN that wait for a later turn of the loop (receive.pxi):
# a turn writes a share of them (RX_TURN), the oldest first, so that a
# stream's backlog never keeps the loop writing for long. A packet whose flow
# has nothing waiting is written at once, once per flow a turn: a sparse flow
# (a ping, control, an acknowledgement) goes ahead of the backlog, and no
# flow's packets change order (flow buckets: keyed fq_flow_of, FLOW_BUCKETS).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from .constants cimport BATCH, FLOW_BUCKETS, GRO_TRAIN_MAX
from .flowqueue cimport flow_bucket

cdef enum:
    # Packets written to the TUN per turn of the loop, besides sparse ones:
    # about 60 us of writes. Against 256, a ping under a stream waited 0.68
    # times as long, and the stream kept its rate; 64 cut the wait further
    # (0.55) but cost the stream 5 to 7%.
    RX_TURN = 2 * BATCH
    # What may wait: every receive slot's train, whole.
    RX_WAITING = BATCH * GRO_TRAIN_MAX


cdef struct Waiting:
    # A packet (in clear) for the TUN, where it is in its receive slot, and
    # its flow bucket.
    uint8_t *p
    uint32_t n
    uint16_t slot
    uint16_t bucket


cdef struct Backlog:
    # What waits, the oldest first (a ring of RX_WAITING from head), how much
    # of it per flow bucket, the turn each bucket last went ahead in, this
    # turn's number and what it wrote.
    Waiting *waiting
    int head
    int count
    uint16_t per_bucket[FLOW_BUCKETS]
    uint32_t ahead_turn[FLOW_BUCKETS]
    uint32_t turn
    int written
    uint64_t key


cdef inline bint backlog_init(Backlog *q, uint64_t key) noexcept nogil:
    """An empty backlog whose flow hash has ``key``; False if out of memory."""
    cdef int i
    q.waiting = <Waiting *>malloc(RX_WAITING * sizeof(Waiting))
    q.head = q.count = q.written = 0
    q.turn = 1
    q.key = key
    for i in range(FLOW_BUCKETS):
        q.per_bucket[i] = 0
        q.ahead_turn[i] = 0
    return q.waiting != NULL


cdef inline void backlog_free(Backlog *q) noexcept nogil:
    free(q.waiting)
    q.waiting = NULL


cdef inline bint backlog_now(Backlog *q, const uint8_t *p, size_t n, uint32_t *bucket) noexcept nogil:
    """Whether packet p[:n] is written now (the caller writes it): nothing
    waits and the turn's share is not spent, or its flow has nothing waiting
    and has not gone ahead yet this turn, or nothing more can wait. Else it
    is to wait (backlog_push), in flow ``bucket``."""
    if q.count == 0 and q.written < RX_TURN:
        q.written += 1
        return True
    bucket[0] = flow_bucket(p, n, q.key)
    if (q.per_bucket[bucket[0]] == 0 and q.ahead_turn[bucket[0]] != q.turn) or \
            q.count == RX_WAITING:
        q.ahead_turn[bucket[0]] = q.turn
        return True
    return False


cdef inline void backlog_push(Backlog *q, uint8_t *p, size_t n, int slot,
                              uint32_t bucket) noexcept nogil:
    """Packet p[:n], in receive slot ``slot``, waits after the rest."""
    cdef Waiting *w = &q.waiting[(q.head + q.count) % RX_WAITING]
    w.p = p
    w.n = <uint32_t>n
    w.slot = <uint16_t>slot
    w.bucket = <uint16_t>bucket
    q.count += 1
    q.per_bucket[bucket] += 1


cdef inline Waiting *backlog_next(Backlog *q) noexcept nogil:
    """The oldest packet that waits, taken off (the caller writes it), while
    the turn's share lasts; else NULL."""
    cdef Waiting *w
    if q.count == 0 or q.written >= RX_TURN:
        return NULL
    w = &q.waiting[q.head]
    q.per_bucket[w.bucket] -= 1
    q.head = (q.head + 1) % RX_WAITING
    q.count -= 1
    q.written += 1
    return w


cdef inline void backlog_turn(Backlog *q) noexcept nogil:
    """The next turn of the loop begins: a new share."""
    q.written = 0
    q.turn += 1
