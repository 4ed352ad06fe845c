import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import requires_root

pytestmark = [requires_root, pytest.mark.netns]


def namespaces():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_demo_tunnel_beats_every_link(tmp_path):
    # Run as a user would, by the installed command, from a directory holding a
    # `multitun` source tree that is not the installed package (a checkout
    # without the compiled module): what the demo starts must not pick it up.
    decoy = tmp_path / "multitun"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy was imported')\n")
    before = namespaces()
    report, png = tmp_path / "r.json", tmp_path / "r.png"
    command = Path(sys.executable).parent / "multitun"
    proc = subprocess.run([command, "demo", "--duration", "20",
                           "--json", str(report), "--plot", str(png)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "all links up; measuring for 20 s" in proc.stdout
    assert proc.stdout.count("s  lte ") >= 15  # a live line about every second
    r = json.loads(report.read_text())
    tunnel = r["tunnel"]
    assert tunnel["p99_ms"] is not None
    for path in r["paths"]:
        # A link whose p99 is None never delivered 99% of what was sent.
        assert path["p99_ms"] is None or tunnel["p99_ms"] < path["p99_ms"], path
        if path["loss_pct"] > 0:
            assert tunnel["loss_pct"] < path["loss_pct"], path
    assert sum(p["first_arrival_pct"] for p in r["paths"]) == pytest.approx(100, abs=0.5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert namespaces() == before


def test_demo_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "multitun", "demo", "--duration", "1"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--duration must be between 2 and 3600 seconds" in proc.stderr
