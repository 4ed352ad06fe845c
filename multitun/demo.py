"""``multitun demo``: the tunnel against each of its paths, on emulated links.

It builds a client and a server network namespace joined by three emulated
paths (multitun.lab, multitun.lab.emulator) that behave like real links, runs a
multitun server and client across them, and sends timestamped datagrams over
each bare path and through the tunnel at the same time, so that all see the
same conditions. While it runs it prints a line a second; at the end, a table
of each path against the tunnel. Everything it made is removed when it ends,
also on error or Ctrl-C.

``--load`` runs the load scenario instead (multitun.lab.load): video and
control traffic through the tunnel over a fast path that fails and a
capacity-limited LTE-like backup, shown per second and per phase.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from .errors import OneLineParser
from .lab import TUN_CLIENT, TUN_SERVER, Bed, TunnelPair, latency_probe, load, summarise
from .lab.emulator import Impairment
from .status import StatusError, query


def profiles(duration: float) -> list[tuple[str, Impairment]]:
    """Three links as found in the field. The 5G-like one goes away for 3 s
    from a quarter of the way in (counted from when the bed is built)."""
    start = 1.0 + duration / 4
    return [
        ("lte", Impairment(delay_ms=35, jitter_ms=15, loss_pct=2)),
        ("5g", Impairment(delay_ms=15, jitter_ms=10, loss_pct=1, outages=((start, start + 3),))),
        ("wifi", Impairment(delay_ms=8, jitter_ms=6, burst=(0.005, 0.3))),
    ]


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="multitun demo",
        description="Run a tunnel over three emulated links (LTE-like 35 +- 15 ms, 2%% loss; "
                    "5G-like 15 +- 10 ms, 1%% loss, a 3 s outage; Wi-Fi-like 8 +- 6 ms with "
                    "bursts of loss) between two network namespaces, and compare its one-way "
                    "delay and loss with each link's. Needs root; leaves nothing behind.")
    p.add_argument("--duration", type=float, metavar="S",
                   help="seconds of measurement (default 20)")
    p.add_argument("--rate", type=float, metavar="PPS",
                   help="probe datagrams per second on each path and the tunnel (default 100)")
    p.add_argument("--load", action="store_true",
                   help="instead: 9.6 Mbit/s of video and 100 control datagrams a second "
                        "through the tunnel, over a 40 Mbit/s path that fails from 10 to 13 s "
                        "and an LTE-like backup (30 ms, 6 Mbit/s, a modem's buffer); 18 s")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="draw delay distributions and a timeline (needs matplotlib)")
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.load and (args.duration is not None or args.rate is not None):
        parser.error("--load runs its own scenario: no --duration or --rate with it")
    args.duration = 20.0 if args.duration is None else args.duration
    args.rate = 100.0 if args.rate is None else args.rate
    if not 2 <= args.duration <= 3600:
        parser.error("--duration must be between 2 and 3600 seconds")
    if not 1 <= args.rate <= 10000:
        parser.error("--rate must be between 1 and 10000")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            print("multitun demo: error: --plot needs matplotlib (multitun's 'plot' extra)",
                  file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("multitun demo: error: needs root or CAP_NET_ADMIN (network namespaces, "
              "TUN devices)", file=sys.stderr)
        return 2
    try:
        report = run_load() if args.load else run(args.duration, args.rate)
    except KeyboardInterrupt:  # the bed is gone by now: its with-block ended
        print("interrupted; namespaces removed", file=sys.stderr)
        return 130
    if args.load:
        print("\nPer phase: control datagrams' one-way delay ('-': more than 1% lost), "
              "video delivered:\n" + load.table(report["phases"]))
    else:
        print_summary(report)
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in report.items() if k != "raw"},
                                        indent=2))
        print(f"results written to {args.json}")
    if args.plot:
        (plot_load if args.load else plot)(report, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def run(duration: float, rate: float) -> dict:
    links = profiles(duration)
    with tempfile.TemporaryDirectory() as logs, \
            Bed(len(links), emulate=[(imp, imp) for _, imp in links]) as bed, \
            TunnelPair(bed, Path(logs)) as pair:
        print(f"{len(links)} emulated links between namespaces {bed.client} and {bed.server}:")
        for (name, imp), p in zip(links, bed.paths):
            print(f"  {name:5} {p.client_ip} -> {p.server_ip}  {describe(imp)}")
        print(f"tunnel {TUN_CLIENT} -> {TUN_SERVER} carrying after {pair.wait_carrying():.1f} s")
        wait_all_up(bed, len(links))
        print(f"all links up; measuring for {duration:g} s at {rate:g} datagrams/s on each")
        targets = {name: (p.client_ip, p.server_ip) for (name, _), p in zip(links, bed.paths)}
        targets["tunnel"] = (TUN_CLIENT, TUN_SERVER)
        started = time.monotonic_ns()
        sent_ns: list[int] = []
        raw = latency_probe(bed, targets, rate, duration, sent_ns=sent_ns,
                            progress=lambda res: live_line(bed, res, started, rate))
        wins = first_arrivals(bed)
        # When each datagram left, on the emulator's clock (its outages' clock).
        sent_s = [round((ns - bed.emulator_start_ns) / 1e9, 4) for ns in sent_ns]
    report = {
        "duration_s": duration, "rate_pps": rate,
        "paths": [{"name": name, **describe_json(imp), **summarise(raw[name]),
                   "first_arrival_pct": wins.get(i)}
                  for i, (name, imp) in enumerate(links)],
        "tunnel": summarise(raw["tunnel"]),
        "raw": {"latencies_ms": raw, "sent_s": sent_s,
                "outages": [list(o) for _, imp in links for o in imp.outages]},
    }
    print("namespaces removed")
    return report


def run_load() -> dict:
    scenario = load.Scenario()
    with tempfile.TemporaryDirectory() as logs, scenario.bed() as bed, \
            TunnelPair(bed, Path(logs)) as pair:
        print(f"path 0: {scenario.best_delay_ms:g} ms, {scenario.best_rate_bps / 1e6:g} Mbit/s, "
              f"down {scenario.outage[0]:g}-{scenario.outage[1]:g} s; path 1: "
              f"{scenario.backup_delay_ms:g} ms, {scenario.backup_rate_bps / 1e6:g} Mbit/s, "
              f"a {scenario.backup_queue}-frame buffer")
        print(f"tunnel {TUN_CLIENT} -> {TUN_SERVER} carrying after {pair.wait_carrying():.1f} s; "
              f"sending {scenario.video_bps / 1e6:g} Mbit/s of video and "
              f"{scenario.control_hz:g} control datagrams a second until "
              f"{scenario.end:g} s")
        result = load.run(bed, scenario, progress=lambda *a: load_line(bed, *a))
    print("namespaces removed")
    return {"scenario": {"outage_s": list(scenario.outage), "end_s": scenario.end,
                         "backup_mbit_s": scenario.backup_rate_bps / 1e6,
                         "video_mbit_s": scenario.video_bps / 1e6},
            "phases": result.phases,
            "raw": {"control": result.control, "video": result.video}}


def load_line(bed: Bed, at: float, control: list[float | None], video_mbit: float) -> None:
    got = sorted(v for v in control if v is not None)
    p50 = f"{got[len(got) // 2]:6.1f} ms" if got else "     -   "
    try:
        st = query("multitun0", bed.socket(bed.client, socket.AF_UNIX, socket.SOCK_STREAM))
        paths = " | ".join(
            f"path{p['index']} {p['state']:4}"
            + (f" paced {p['pacing_mbit']:.1f} Mbit/s" if p["pacing_mbit"] else "")
            for p in st["paths"])
    except StatusError:
        paths = ""
    print(f"  {at:4.0f}s  control p50 {p50}, {len(control) - len(got):3d} lost | video "
          f"{video_mbit:5.2f} Mbit/s | {paths}", flush=True)


def describe(imp: Impairment) -> str:
    out = f"{imp.delay_ms:g} +- {imp.jitter_ms:g} ms"
    if imp.loss_pct:
        out += f", {imp.loss_pct:g}% loss"
    if imp.burst:
        out += f", bursts of loss (mean {1 / imp.burst[1]:.1f} packets)"
    for a, b in imp.outages:
        out += f", down {a:g}-{b:g} s"
    return out


def describe_json(imp: Impairment) -> dict:
    return {"emulated": {"delay_ms": imp.delay_ms, "jitter_ms": imp.jitter_ms,
                         "loss_pct": imp.loss_pct, "burst": imp.burst,
                         "outages_s": [list(o) for o in imp.outages]}}


def wait_all_up(bed: Bed, npaths: int, timeout: float = 10.0) -> None:
    """Until the client's probes are answered on every path: then every link's
    neighbours are resolved too, and the first datagrams measured are not held
    back by ARP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = query("multitun0", bed.socket(bed.client, socket.AF_UNIX, socket.SOCK_STREAM))
            if sum(p["state"] == "up" for p in st["paths"]) == npaths:
                return
        except StatusError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"not every path came up within {timeout:g}s")


def first_arrivals(bed: Bed) -> dict[int, float]:
    """Per path, the share of packets the server got first by it."""
    try:
        st = query("multitun0", bed.socket(bed.server, socket.AF_UNIX, socket.SOCK_STREAM))
    except StatusError:
        return {}
    total = sum(p["first_arrivals"] for p in st["paths"]) or 1
    return {p["index"]: round(100 * p["first_arrivals"] / total, 1) for p in st["paths"]}


def live_line(bed: Bed, results: dict, started: int, rate: float) -> None:
    sent = int((time.monotonic_ns() - started) / 1e9 * rate)
    cells = []
    for name, lat in results.items():
        window = lat[max(0, sent - int(rate)):max(0, sent - int(rate / 5))]  # the last second
        got = sorted(v for v in window if v is not None)
        p50 = f"{got[len(got) // 2]:5.1f}" if got else "  -  "
        loss = 100 * (1 - len(got) / len(window)) if window else 0.0
        cells.append(f"{name} {p50} ms {loss:3.0f}%")
    wins = first_arrivals(bed)
    won = " ".join(f"{name}:{pct:.0f}%" for name, pct in zip(
        [n for n in results if n != "tunnel"], (wins.get(i, 0) for i in range(len(wins)))))
    print(f"  {(time.monotonic_ns() - started) / 1e9:4.0f}s  " + " | ".join(cells)
          + (f" | first: {won}" if won else ""), flush=True)


def print_summary(report: dict) -> None:
    rows = [(p["name"], p) for p in report["paths"]] + [("tunnel", report["tunnel"])]
    print("\nOne-way delay within which 50/90/99/99.9% of the datagrams sent arrived "
          "('never': more were lost):")
    print(f"{'':8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
          f"{'jitter':>7} {'loss %':>7} {'first %':>8}")
    for name, r in rows:
        cells = [r[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms")]
        first = r.get("first_arrival_pct")
        print(f"{name:8} " + " ".join(f"{'never' if v is None else f'{v:.1f}':>{w}}"
                                      for v, w in zip(cells, (8, 8, 8, 9)))
              + f" {'-' if r['jitter_ms'] is None else format(r['jitter_ms'], '.1f'):>7}"
              + f" {r['loss_pct']:7.2f} {'' if first is None else f'{first:.1f}':>8}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = report["raw"]
    fig, (cdf, timeline) = plt.subplots(2, 1, figsize=(10, 9))
    for name, lat in raw["latencies_ms"].items():
        got = sorted(v for v in lat if v is not None)
        if got:
            style = {"linewidth": 2.5, "color": "black"} if name == "tunnel" else {}
            cdf.plot(got, [(i + 1) / len(lat) for i in range(len(got))], label=name, **style)
        t = [sent for sent, v in zip(raw["sent_s"], lat) if v is not None]
        style = {"s": 6, "color": "black"} if name == "tunnel" else {"s": 3, "alpha": 0.5}
        timeline.scatter(t, [v for v in lat if v is not None], label=name, **style)
    cdf.set(xlabel="one-way delay (ms)", ylabel="fraction of datagrams delivered",
            title="Delay distribution (a curve ends below 1 by its loss)")
    cdf.set_xscale("log")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend()
    for a, b in raw["outages"]:
        timeline.axvspan(a, b, color="red", alpha=0.1, label="5g outage")
    timeline.set(xlabel="time since the links came up (s)", ylabel="one-way delay (ms)",
                 title="Every datagram, over time")
    timeline.legend(markerscale=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw, scenario = report["raw"], report["scenario"]
    fig, (delay, video) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    delay.scatter([t for t, d in raw["control"] if d is not None],
                  [d for _, d in raw["control"] if d is not None], s=4, color="black",
                  label="control datagrams")
    lost = [t for t, d in raw["control"] if d is None]
    if lost:
        delay.scatter(lost, [0] * len(lost), marker="x", color="red", label="lost")
    delay.set(ylabel="one-way delay (ms)", title="Control traffic through the tunnel")
    delay.set_yscale("log")
    # Video delivered per quarter second, by send time.
    step = 0.25
    bins: dict[int, int] = {}
    for t, got in raw["video"]:
        bins[int(t / step)] = bins.get(int(t / step), 0) + got
    keys = sorted(bins)
    size = (load.Scenario.video_payload + load.INNER_HEADERS) * 8 / 1e6 / step
    video.plot([k * step for k in keys], [bins[k] * size for k in keys], color="black",
               label="video delivered")
    video.axhline(scenario["backup_mbit_s"], color="grey", linestyle="--",
                  label="backup path's capacity")
    video.set(xlabel="time (s)", ylabel="Mbit/s", title="Video through the tunnel")
    for ax, where in ((delay, "upper right"), (video, "lower left")):
        ax.axvspan(*scenario["outage_s"], color="red", alpha=0.1, label="best path down")
        ax.grid(True, alpha=0.3)
        ax.legend(loc=where)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
