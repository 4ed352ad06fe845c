import subprocess
import sys

import pytest

from .conftest import requires_root

pytestmark = [requires_root, pytest.mark.netns]


def namespaces():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_demo_runs_and_leaves_nothing():
    before = namespaces()
    proc = subprocess.run([sys.executable, "-m", "multitun", "demo"], capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "0 of 500 lost" in proc.stdout
    assert "1500 of 1500 datagrams delivered, 0 duplicates" in proc.stdout
    assert namespaces() == before
