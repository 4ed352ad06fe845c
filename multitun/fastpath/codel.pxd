# CoDel (RFC 8289): a queue is too long when its packets' sojourn time has
# stayed above a target for an interval; then it drops, ever more often
# (interval / sqrt(count) apart), until the sojourn time falls below target.
# Its state and control law, for the flows of a paced path's queue
# (flowqueue.pxd, which runs the RFC's dequeue loop).

from libc.math cimport sqrt
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef enum:
    # RFC 8289 section 4.3 and 4.4: a target of 5 ms, an interval of 100 ms
    # (a round trip of the flows it controls).
    CODEL_TARGET_NS = 5000000
    CODEL_INTERVAL_NS = 100000000


cdef struct CoDel:
    # RFC 8289 section 5: when the sojourn time first went above target (0:
    # it is below), when the next drop is due, drops in this dropping state
    # and in the last one.
    bint dropping
    uint64_t first_above_ns
    uint64_t drop_next_ns
    uint32_t count
    uint32_t lastcount


cdef inline uint64_t codel_control_law(uint64_t t, uint32_t count, uint64_t interval_ns) noexcept nogil:
    # RFC 8289 section 5.5: the next drop comes interval/sqrt(count) later.
    return t + <uint64_t>(interval_ns / sqrt(<double>count))


cdef inline bint codel_ok_to_drop(CoDel *c, uint64_t now, uint64_t sojourn_ns, bint short_queue,
                                  uint64_t target_ns, uint64_t interval_ns) noexcept nogil:
    """RFC 8289 section 5.4 (dodequeue's judgement): whether the sojourn time
    has stayed above target for an interval. A queue down to a packet's
    worth (``short_queue``) is never judged: it is not standing."""
    if sojourn_ns < target_ns or short_queue:
        c.first_above_ns = 0
        return False
    if c.first_above_ns == 0:
        c.first_above_ns = now + interval_ns
        return False
    return now >= c.first_above_ns


cdef inline void codel_enter(CoDel *c, uint64_t now, uint64_t interval_ns) noexcept nogil:
    """Enter the dropping state (its first drop is the caller's). If the
    last one was recent, resume near its drop rate (RFC 8289 section 5.5,
    as Linux does it)."""
    cdef uint32_t delta = c.count - c.lastcount
    # Signed: drop_next may lie ahead of now.
    if delta > 1 and <int64_t>(now - c.drop_next_ns) < <int64_t>(16 * interval_ns):
        c.count = delta
    else:
        c.count = 1
    c.drop_next_ns = codel_control_law(now, c.count, interval_ns)
    c.lastcount = c.count
    c.dropping = True
