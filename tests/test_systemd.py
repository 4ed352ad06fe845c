"""The systemd unit and readiness notification."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from multitun.lab import TunnelPair
from multitun.system import notify_systemd

from .conftest import requires_root

UNITS = Path(__file__).resolve().parent.parent / "packaging" / "systemd"
UNIT = UNITS / "multitun@.service"
FLEET_UNIT = UNITS / "multitun-fleet@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (no systemd on this machine)")
@pytest.mark.parametrize("source", [UNIT, FLEET_UNIT], ids=["one client", "fleet"])
def test_unit_verifies(tmp_path, source):
    unit = tmp_path / source.name.replace("@.", "@test.")
    unit.write_text(source.read_text().replace("/usr/local/bin/multitun", shutil.which("true")))
    # --man=no: the man page is checked where it is installed (test_packaging.py).
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_unit_runs_the_config_file_of_the_instance():
    text = UNIT.read_text()
    assert ("ExecStart=/usr/local/bin/multitun --config /etc/multitun/%i.toml "
            "--key-file %d/key") in text
    assert "LoadCredential=key:/etc/multitun/%i.key" in text
    assert "Type=notify" in text and "CapabilityBoundingSet=CAP_NET_ADMIN" in text


def test_fleet_unit_reloads_its_peers():
    # Key files are read again at each reload, so they are files, not
    # credentials (read once at start): no --key-file and no dynamic user.
    text = FLEET_UNIT.read_text()
    assert "ExecStart=/usr/local/bin/multitun --config /etc/multitun/%i.toml\n" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "DynamicUser" not in text and "CapabilityBoundingSet=CAP_NET_ADMIN" in text


@requires_root
@pytest.mark.netns
def test_ready_is_notified(bed, tmp_path, monkeypatch):
    # A path socket, not an abstract one: the tunnel runs in another network
    # namespace, and abstract names do not cross namespaces.
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        with TunnelPair(bed, tmp_path) as pair:
            assert sock.recv(64) == b"READY=1"  # the first of the two ends
            assert sock.recv(64) == b"READY=1"
            pair.wait_carrying()
            pair.stop_client()
            assert sock.recv(64) == b"STOPPING=1"


def test_notify_to_an_abstract_socket(monkeypatch):
    # sd_notify(3): a NOTIFY_SOCKET starting with '@' is an abstract name.
    name = f"multitun-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify_systemd("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_no_notify_socket_no_notification(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify_systemd("READY=1")  # not under systemd: nothing, and no error
