"""Pure-Python twin of the data plane's de-duplication window.

It exists to be read and to be tested against: the compiled window in
``multitun._fastpath`` must give the same verdict for every sequence of numbers
(tests/test_window.py runs the same tables and properties against both).

The algorithm is RFC 6479's: a ring of 64-bit words covers the newest
``bits`` sequence numbers. Moving forward clears only the words that slide
out, so every test-and-set is O(1) whatever the jump. One word is kept as slack
so that the newest word can be partly filled: numbers more than
``bits - 64`` behind the newest are too old.
"""

from __future__ import annotations

NEW, DUPLICATE, TOO_OLD = 0, 1, 2
WORD = 64


class ReplayWindow:
    def __init__(self, bits: int = 65536) -> None:
        if bits < 2 * WORD or bits & (bits - 1):
            raise ValueError("bits must be a power of two >= 128")
        self.words = [0] * (bits // WORD)
        self.mask = len(self.words) - 1
        self.limit = bits - WORD
        self.top = 0

    def reset(self) -> None:
        self.words = [0] * len(self.words)
        self.top = 0

    def check(self, seq: int) -> int:
        """Test-and-set ``seq``: NEW the first time, then DUPLICATE; TOO_OLD when
        it lies behind the window."""
        if seq > self.top:
            cur, new = self.top // WORD, seq // WORD
            for i in range(1, min(new - cur, len(self.words)) + 1):
                self.words[(cur + i) & self.mask] = 0
            self.top = seq
        elif self.top - seq >= self.limit:
            return TOO_OLD
        index = (seq // WORD) & self.mask
        bit = 1 << (seq % WORD)
        if self.words[index] & bit:
            return DUPLICATE
        self.words[index] |= bit
        return NEW
