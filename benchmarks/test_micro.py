"""Micro-benchmarks of the data plane's pieces: only the hot call is timed."""

import array

import pytest

from multitun import _reference, _testing, wire

# Two paths' worth: every number twice, the second copy a little late.
SEQS = array.array("Q", (s for base in range(0, 200_000, 2)
                         for s in (base, base + 1, base, base + 1)))


def test_window_compiled(benchmark):
    window = _testing.ReplayWindow()

    def run():
        window.reset()
        return window.check_many(SEQS)

    fresh = benchmark(run)
    assert fresh == 200_000
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["ns_per_check"] = round(
            benchmark.stats.stats.median / len(SEQS) * 1e9, 2)


def test_window_reference(benchmark):
    seqs = SEQS[:20_000]

    def run():
        window = _reference.ReplayWindow(_testing.ReplayWindow.bits)
        return sum(window.check(s) == _reference.NEW for s in seqs)

    assert benchmark(run) == 20_000 // 2


def test_checksum_compiled(benchmark):
    """The RFC 1071 sum of a 1400-byte packet, as segmentation computes it
    for every packet of a TSO segment."""
    data = bytes(range(256)) * 6
    count = 8_000
    total = benchmark(_testing.checksum_total, data, 1400, count)
    # Each folded sum is the one's complement of the checksum stored.
    expected = sum(~int.from_bytes(_testing.internet_checksum(data[i:i + 1400]), "little")
                   & 0xFFFF for i in range(8)) * (count // 8)
    assert total == expected
    if benchmark.stats:
        benchmark.extra_info["ns_per_packet"] = round(
            benchmark.stats.stats.median / count * 1e9, 2)


def test_header_codec_compiled(benchmark):
    datagram = wire.pack_header(wire.PacketType.DATA, 1, 0xABCDEF01, 12345) + bytes([0x45]) + bytes(1399)
    assert benchmark(_testing.unpack_header, datagram)[3] == 12345


def test_header_codec_reference(benchmark):
    datagram = wire.pack_header(wire.PacketType.DATA, 1, 0xABCDEF01, 12345) + bytes([0x45]) + bytes(1399)
    assert benchmark(wire.unpack_header, datagram).seq == 12345


@pytest.mark.parametrize("keyed", [False, True], ids=["clear", "sealed"])
def test_engine_batch(benchmark, keyed):
    """64 packets of 1400 bytes through two engines on loopback (socketpairs
    as TUNs): the data plane's whole path, syscalls (and sealing) included,
    without devices."""
    from multitun.lab.engine_pair import EnginePair, ipv4

    pair = EnginePair(keyed=keyed)
    packets = [ipv4(i) for i in range(64)]

    def batch():
        pair.send(0, packets)
        pair.pump()
        return len(pair.received(1))

    try:
        assert benchmark(batch) == 64
        if benchmark.stats:
            benchmark.extra_info["us_per_packet"] = round(
                benchmark.stats.stats.median / 64 * 1e6, 2)
    finally:
        pair.close()
