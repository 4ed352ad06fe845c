"""End to end, on the lab's beds, in one run: the tunnel against the bare
path it runs over. Figures are ratios and differences measured side by side,
never absolute times (the machine is shared and noisy).

    python3 -m pytest benchmarks/test_e2e.py -s --benchmark-json=e2e.json
    python3 -m pytest benchmarks/test_e2e.py -s --compare-cmd "/path/to/other-tunnel"

Each scenario's figures are in the JSON's ``extra_info``.
"""

import shutil
import statistics

import pytest

from multitun import _fastpath
from multitun.lab.emulator import Impairment
from multitun.lab.tunnel_pair import key_args
from multitun.lab import (
    TUN_SERVER, Bed, TunnelPair, added_under_stream, latency_probe, ping_interleaved, summarise,
    tcp_throughput, udp_flood, udp_stream,
)

from .conftest import requires_root

pytestmark = requires_root

BARE = "192.0.2.1"  # path 0's server address: the bare veth path


@pytest.fixture(scope="module")
def pair(tunnel_cmd, tmp_path_factory):
    with Bed(2) as bed, TunnelPair(bed, tmp_path_factory.mktemp("logs"),
                                   command=tunnel_cmd) as pair:
        pair.wait_carrying()
        yield pair


def record(benchmark, **figures):
    benchmark.extra_info.update(figures)
    print("\n" + ", ".join(f"{k} {v}" for k, v in figures.items()))


def test_tcp_throughput_ratio(benchmark, pair):
    """One TCP stream through the two-path tunnel against one bare veth path
    (iperf3 if installed, else the lab's own sender and receiver)."""
    bed = pair.bed
    rounds = {"bare": [], "tunnel": []}

    def measure():
        for _ in range(3):  # alternate, so both see the same machine
            rounds["bare"].append(tcp_throughput(bed, bed.client, bed.server, BARE))
            rounds["tunnel"].append(tcp_throughput(bed, bed.client, bed.server, TUN_SERVER))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    bare, tunnel = statistics.median(rounds["bare"]), statistics.median(rounds["tunnel"])
    record(benchmark, scenario="tcp", tool="iperf3" if shutil.which("iperf3") else "built-in",
           bare_gbit_s=round(bare, 2),
           tunnel_gbit_s=round(tunnel, 2), ratio=round(tunnel / bare, 3))
    if pair.command is None:
        # With TUN segmentation offload and coalescing (issue 6); 0.10 without.
        assert tunnel / bare >= 0.25


@pytest.mark.parametrize("size", [64, 1400])
def test_udp_packets_per_second(benchmark, pair, size):
    """Datagrams per second from one sender process, tunnel against bare path."""
    bed = pair.bed
    result = {}

    def measure():
        result["bare"] = udp_flood(bed, bed.client, bed.server, BARE, size)
        result["tunnel"] = udp_flood(bed, bed.client, bed.server, TUN_SERVER, size)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    bare, tunnel = result["bare"]["received_pps"], result["tunnel"]["received_pps"]
    record(benchmark, scenario=f"udp{size}", bare_pps=bare, tunnel_pps=tunnel,
           ratio=round(tunnel / bare, 3))
    assert tunnel > 0
    if pair.command is None and size == 1400:
        assert tunnel / bare >= 0.5


RTT_MODES = {
    "default": (),
    "low-latency": ("--low-latency",),
    # polling across the 1 ms between pings: the engines never sleep
    "low-latency-poll-2ms": ("--low-latency", "--busy-poll", "2000"),
}


@pytest.mark.parametrize("mode", list(RTT_MODES))
def test_added_rtt_idle(benchmark, tunnel_cmd, tmp_path, mode):
    """Median ICMP round trip through the tunnel minus over the bare path,
    pinged alternately (1 ms apart) so that both see the same CPU idle states."""
    if tunnel_cmd and mode != "default":
        pytest.skip("--low-latency and --busy-poll are multitun's")
    extra = RTT_MODES[mode]
    with Bed(2) as bed, TunnelPair(bed, tmp_path, server_extra=extra, client_extra=extra,
                                   command=tunnel_cmd) as pair:
        pair.wait_carrying()
        result = {}
        benchmark.pedantic(lambda: result.update(ping_interleaved(
            bed, bed.client, [BARE, TUN_SERVER], count=2000, interval=0.001)),
            rounds=1, iterations=1)
    assert None not in result[TUN_SERVER]
    bare = statistics.median(result[BARE]) * 1e6
    tunnel = statistics.median(result[TUN_SERVER]) * 1e6
    record(benchmark, scenario=f"rtt-idle-{mode}", bare_median_us=round(bare, 1),
           tunnel_median_us=round(tunnel, 1), added_us=round(tunnel - bare, 1))
    if tunnel_cmd is None:
        # Default: three cross-CPU wake-ups of halted vCPUs dominate on a VM
        # (the original tool: +61..81 us on this bed); --low-latency makes
        # them cheap, polling across the ping interval removes them.
        assert tunnel - bare <= {"default": 150, "low-latency": 60,
                                 "low-latency-poll-2ms": 40}[mode]


def test_added_rtt_under_load(benchmark, pair):
    """The same, while one TCP stream fills the tunnel: the median and the
    99th percentile added to the bare path's, and the stream's rate. Twice:
    as the pair runs on this machine, where its two ends share the CPUs with
    the stream's, and with each end on a CPU of its own, as on two hosts."""
    result = {}

    def measure():
        result["shared"] = added_under_stream(pair.bed, BARE, TUN_SERVER)
        with pair.own_cpus() as apart:
            if apart:
                result["own_cpus"] = added_under_stream(pair.bed, BARE, TUN_SERVER)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    record(benchmark, scenario="rtt-loaded", **{
        f"{bed}_{k}": v for bed, figures in result.items() for k, v in figures.items()})
    if pair.command is None:
        # +0.2 to +0.35 ms on this 2-CPU machine (the aim: +0.3 ms), against
        # +1.0 to +1.5 ms before the engine read ahead of the stream's
        # backlogs: this bound catches their return, not a miss of the aim.
        assert result["shared"]["added_us"] <= 600


def test_low_latency_under_load(benchmark, tmp_path):
    """What --low-latency trades when the tunnel is the bottleneck: pairs with
    and without it in turn on one bed. With each end on a CPU of its own (as
    on two hosts), the round trip added (median, 99th percentile) while one
    TCP stream fills the tunnel, and the stream's rate; as the pair runs
    here, one TCP stream's rate and 1400-byte datagrams a second. Medians
    over the rounds."""
    runs = {"default": [], "low_latency": []}
    with Bed(2) as bed:
        def rounds():
            for i in range(3):
                for name, extra in (("default", ()), ("low_latency", ("--low-latency",))):
                    logs = tmp_path / f"{name}{i}"
                    logs.mkdir()
                    with TunnelPair(bed, logs, server_extra=extra,
                                    client_extra=extra) as pair:
                        pair.wait_carrying()
                        with pair.own_cpus():
                            figures = added_under_stream(bed, BARE, TUN_SERVER)
                        figures["tcp_gbit_s"] = round(
                            tcp_throughput(bed, bed.client, bed.server, TUN_SERVER), 2)
                        figures["udp1400_pps"] = udp_flood(bed, bed.client, bed.server, TUN_SERVER,
                                                           1400)["received_pps"]
                        runs[name].append(figures)

        benchmark.pedantic(rounds, rounds=1, iterations=1)
    figures = {f"{name}_{k}": statistics.median(r[k] for r in rs)
               for name, rs in runs.items() for k in rs[0]}
    record(benchmark, scenario="low-latency-loaded", **figures)
    # The trade is large on this bed (the 99th percentile falls to about a
    # third): the bound checks its direction only.
    assert figures["low_latency_p99_added_us"] < figures["default_p99_added_us"]


IMPAIRED = [(Impairment(delay_ms=10, jitter_ms=3, loss_pct=5),) * 2,
            (Impairment(delay_ms=20, jitter_ms=5, loss_pct=5),) * 2]


def test_impaired_paths(benchmark, tunnel_cmd, tmp_path):
    """Two lossy, jittery paths: delay and loss of each against the tunnel."""
    with Bed(2, emulate=IMPAIRED, seed=3) as bed, \
            TunnelPair(bed, tmp_path, command=tunnel_cmd) as pair:
        pair.wait_carrying()
        targets = {f"path{p.index}": (p.client_ip, p.server_ip) for p in bed.paths}
        targets["tunnel"] = ("10.42.42.2", TUN_SERVER)
        result = {}
        benchmark.pedantic(lambda: result.update(latency_probe(bed, targets, 200, 5)),
                           rounds=1, iterations=1)
    figures = {name: summarise(lat) for name, lat in result.items()}
    record(benchmark, scenario="impaired", **{
        f"{name}_{k}": v[k] for name, v in figures.items() for k in ("p50_ms", "p99_ms", "loss_pct")})
    if tunnel_cmd is None:
        assert figures["tunnel"]["loss_pct"] < min(figures[f"path{i}"]["loss_pct"] for i in (0, 1))
        assert figures["tunnel"]["p50_ms"] <= figures["path0"]["p50_ms"] + 1.0


def test_path_outage(benchmark, tunnel_cmd, tmp_path):
    """Path 0 goes down for 2 s in the middle of a 500 packet/s stream."""
    down = Impairment(outages=((3.0, 5.0),))
    with Bed(2, emulate=[(down, down), None]) as bed, \
            TunnelPair(bed, tmp_path, command=tunnel_cmd) as pair:
        pair.wait_carrying()
        received = []
        benchmark.pedantic(lambda: received.extend(
            udp_stream(bed, bed.client, bed.server, TUN_SERVER, rate=500, count=3000)),
            rounds=1, iterations=1)
    lost = 3000 - len(set(received))
    record(benchmark, scenario="outage", sent=3000, lost=lost,
           duplicates=len(received) - len(set(received)))
    if tunnel_cmd is None:
        assert lost == 0 and len(received) == 3000


SEALED_ROUNDS = 5


def sealed_floor() -> float:
    """Issue 15's target, 0.80 of clear, where libcrypto's AES-GCM can use the
    CPU's VAES and VPCLMULQDQ (OpenSSL 3.1 and later; packaging/libcrypto.sh);
    with an older libcrypto the AES work alone holds it at 0.70 to 0.73 (README),
    so the floor there only catches a regression."""
    version = tuple(int(n) for n in _fastpath.LIBCRYPTO.split()[1].split(".")[:2])
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split())
    return 0.80 if version >= (3, 1) and {"vaes", "vpclmulqdq", "avx512f"} <= flags else 0.65



def test_sealed_throughput_ratio(benchmark, tmp_path):
    """One TCP stream through the two-path tunnel sealed (--key-file) against
    the same tunnel in clear, on one bed, the two alternating."""
    modes = {"clear": (), "sealed": key_args(tmp_path)}
    rounds = {mode: [] for mode in modes}
    with Bed(2) as bed:
        def measure():
            for i in range(SEALED_ROUNDS):
                for mode, extra in modes.items():
                    logs = tmp_path / f"{mode}{i}"
                    logs.mkdir()
                    with TunnelPair(bed, logs, server_extra=extra, client_extra=extra) as pair:
                        pair.wait_carrying()
                        rounds[mode].append(tcp_throughput(bed, bed.client, bed.server,
                                                           TUN_SERVER))

        benchmark.pedantic(measure, rounds=1, iterations=1)
    clear, sealed = statistics.median(rounds["clear"]), statistics.median(rounds["sealed"])
    record(benchmark, scenario="tcp-sealed", libcrypto=_fastpath.LIBCRYPTO,
           clear_gbit_s=round(clear, 2), sealed_gbit_s=round(sealed, 2),
           ratio=round(sealed / clear, 3))
    assert sealed / clear >= sealed_floor()
