# The replay and de-duplication window, RFC 6479: a ring of 64-bit words;
# moving forward clears only the words that slide out, so a test-and-set is
# O(1) whatever the jump. One word is slack. multitun/_reference.py is its
# pure-Python twin; tests/test_window.py runs the same tests against both.

from libc.stdint cimport uint64_t
from .constants cimport WINDOW_WORDS

# Verdicts (multitun/_reference.py has the same).
cdef enum:
    W_NEW = 0
    W_DUPLICATE = 1
    W_TOO_OLD = 2


cdef struct Window:
    uint64_t top
    uint64_t words[WINDOW_WORDS]


cdef inline int window_test(const Window *w, uint64_t seq) noexcept nogil:
    """The verdict on seq, changing nothing (a sealed packet is marked only
    once it has proved authentic)."""
    if seq > w.top:
        return W_NEW
    if w.top - seq >= <uint64_t>(WINDOW_WORDS * 64 - 64):
        return W_TOO_OLD
    if w.words[(seq >> 6) & (WINDOW_WORDS - 1)] & ((<uint64_t>1) << (seq & 63)):
        return W_DUPLICATE
    return W_NEW


cdef inline void window_mark(Window *w, uint64_t seq) noexcept nogil:
    """Record seq as seen (window_test said W_NEW), sliding the window forward
    if seq is the newest yet."""
    cdef uint64_t cur, diff, i
    if seq > w.top:
        cur = w.top >> 6
        diff = (seq >> 6) - cur
        if diff > WINDOW_WORDS:
            diff = WINDOW_WORDS
        i = 1
        while i <= diff:
            w.words[(cur + i) & (WINDOW_WORDS - 1)] = 0
            i += 1
        w.top = seq
    w.words[(seq >> 6) & (WINDOW_WORDS - 1)] |= (<uint64_t>1) << (seq & 63)


cdef inline int window_check(Window *w, uint64_t seq) noexcept nogil:
    cdef int verdict = window_test(w, seq)
    if verdict == W_NEW:
        window_mark(w, seq)
    return verdict
