"""The command line: the original's commands verbatim, and one-line errors."""

import ipaddress
import os
import shlex
import subprocess
import sys

import pytest

from multitun import __version__, _fastpath
from multitun.cli import build_parser, config_from_args, main
from multitun.config import PathSpec

from .conftest import requires_root

SERVER = "-l 10.42.42.1 -s 0.0.0.0 -p 5678"
CLIENT = "-l 10.42.42.2 -c 192.168.123.2:192.168.123.1,10.0.0.2:10.0.0.1 -p 5678"


def config(cmdline: str):
    return config_from_args(build_parser().parse_args(cmdline.split()))


def test_original_server_command():
    cfg = config(SERVER)
    assert cfg.is_server
    assert cfg.server_listen == ipaddress.ip_address("0.0.0.0")
    assert cfg.port == 5678
    assert cfg.tun_addresses == (ipaddress.ip_interface("10.42.42.1/24"),)
    assert cfg.timeout == 20


def test_original_client_command():
    cfg = config(CLIENT)
    assert not cfg.is_server
    ip = ipaddress.ip_address
    assert cfg.paths == (PathSpec(ip("192.168.123.2"), ip("192.168.123.1")),
                         PathSpec(ip("10.0.0.2"), ip("10.0.0.1")))


def test_original_long_flags_and_nonblocking():
    cfg = config("--tun_listen_addr 10.42.42.2 --client_endpoints 192.0.2.2:192.0.2.1 "
                 "--server_port 7000 --timeout 5 --nonblocking")
    assert (cfg.port, cfg.timeout) == (7000, 5)


def test_additions():
    cfg = config("-l 10.42.42.2/30 -l fd42::2/64 -c [2001:db8::2]:[2001:db8::1],192.0.2.2:192.0.2.1 "
                 "--dev mt0 --mtu 1400 --probe-interval 0.5")
    assert cfg.tun_addresses == (ipaddress.ip_interface("10.42.42.2/30"),
                                 ipaddress.ip_interface("fd42::2/64"))
    assert cfg.paths[0] == PathSpec(ipaddress.ip_address("2001:db8::2"),
                                    ipaddress.ip_address("2001:db8::1"))
    assert (cfg.dev, cfg.mtu, cfg.effective_mtu, cfg.probe_interval) == ("mt0", 1400, 1400, 0.5)


@pytest.mark.parametrize("cmdline,mtu", [
    (SERVER, 1500 - 20 - 8 - 16),
    (CLIENT, 1456),
    ("-l 10.42.42.2 -c [2001:db8::2]:[2001:db8::1]", 1500 - 40 - 8 - 16),
    ("-l 10.42.42.2 -c 192.0.2.2:192.0.2.1,[2001:db8::2]:[2001:db8::1]", 1436),
    ("-l 10.42.42.1 -s ::", 1436),
])
def test_default_mtu_fits_a_1500_byte_path(cmdline, mtu):
    assert config(cmdline).effective_mtu == mtu


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # wrapping follows the terminal
    for flag in ("-s ADDR, --server_listen_addr", "-p PORT, --server_port",
                 "-l ADDR[/PREFIX], --tun_listen_addr", "-c LOCAL:SERVER[,...], --client_endpoints",
                 "-n, --nonblocking", "-t SECONDS, --timeout", "--dev",
                 "default multitun%d", "--mtu", "--no-offload", "--low-latency", "multitun demo",
                 "--key-file FILE", "multitun genkey"):
        assert flag in out


@pytest.mark.parametrize("cmdline,busy_poll", [
    (SERVER, 0), (f"{SERVER} --low-latency", 300), (f"{SERVER} --low-latency --busy-poll 2000", 2000),
    (f"{SERVER} --busy-poll 50", 50),
])
def test_busy_poll(cmdline, busy_poll):
    assert config(cmdline).effective_busy_poll_us == busy_poll


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == f"multitun {__version__}"
    assert second == f"libcrypto: {_fastpath.LIBCRYPTO}" and "OpenSSL 3" in second


BAD = [
    (f"{SERVER} -c 192.0.2.2:192.0.2.1", "not allowed with"),
    ("-l 10.42.42.1 -p 5678", "give -s/--server_listen_addr (server) or -c/--client_endpoints (client)"),
    ("-s 0.0.0.0", "-l/--tun_listen_addr"),
    ("-l 10.42.42.300 -s 0.0.0.0", "'10.42.42.300' is not an IP address"),
    ("-l 10.42.42.1/33 -s 0.0.0.0", "bad prefix length"),
    ("-l 10.42.42.0/24 -s 0.0.0.0", "network's own or broadcast"),
    ("-l 10.42.42.1 -s example.org", "server listen address: 'example.org' is not an IP address"),
    ("-l 10.42.42.1 -s 0.0.0.0 -p 0", "port: 0 is out of range 1-65535"),
    ("-l 10.42.42.1 -s 0.0.0.0 -p 65536", "port: 65536 is out of range"),
    ("-l 10.42.42.1 -s 0.0.0.0 -p http", "'http' is not a number"),
    ("-l 10.42.42.2 -c 192.0.2.2", "expected local:server"),
    ("-l 10.42.42.2 -c 192.0.2.2:", "expected local:server"),
    ("-l 10.42.42.2 -c 192.0.2.2:192.0.2.1,", "expected local:server"),
    ("-l 10.42.42.2 -c [2001:db8::2]:[2001:db8::1", "'[2001:db8::1' is not an IP address"),
    ("-l 10.42.42.2 -c 2001:db8::2:2001:db8::1", "'2001' is not an IP address"),
    ("-l 10.42.42.2 -c 192.0.2.300:192.0.2.1", "'192.0.2.300' is not an IP address"),
    ("-l 10.42.42.2 -c averyveryverylongname:192.0.2.1", "neither an IP address nor an interface name"),
    ("-l 10.42.42.2 -c 'wwan 0':192.0.2.1", "neither an IP address nor an interface name"),
    ("-l 10.42.42.2 -c ../x:192.0.2.1", "neither an IP address nor an interface name"),
    ("-l 10.42.42.2 -c wwan[0-:192.0.2.1", "'[' that is never closed"),
    ("-l 10.42.42.2 -c wwan0:wwan1", "'wwan1' is not an IP address"),
    ("-l 10.42.42.2 -c wwan0:192.0.2.1,wwan0:192.0.2.1", "given twice"),
    ("-l 10.42.42.2 -c [fe80::2]:[2001:db8::1]", "give its interface's name instead"),
    ("-l 10.42.42.2 -c [2001:db8::2]:192.0.2.1", "not both IPv4 or IPv6"),
    ("-l 10.42.42.2 -c [2001:db8::2:[2001:db8::1]", "expected [local]:[server]"),
    ("-l 10.42.42.2 -c 192.0.2.2:192.0.2.1,192.0.2.2:192.0.2.1", "given twice"),
    ("-l 10.42.42.1 -s 0.0.0.0 -t 0", "must be more than 0"),
    ("-l 10.42.42.1 -s 0.0.0.0 -t soon", "not a number of seconds"),
    ("-l 10.42.42.1 -s 0.0.0.0 --mtu 100", "out of range 576-"),
    # Our header and the packet fill a UDP datagram: 65507 - 16.
    ("-l 10.42.42.1 -s 0.0.0.0 --mtu 65492", "out of range 576-65491"),
    ("-l fd42::1 -s 0.0.0.0 --mtu 1000", "below IPv6's minimum of 1280"),
    ("-l 10.42.42.1 -s 0.0.0.0 --probe-interval 30", "shorter than the timeout"),
    ("-l 10.42.42.1 -s 0.0.0.0 --frobnicate", "unrecognized arguments: --frobnicate"),
    ("-l 10.42.42.1 -s 0.0.0.0 --busy-poll 200000", "200000 is out of range 0-100000"),
    ("-l 10.42.42.1 -s 0.0.0.0 --cipher chacha20-poly1305", "--cipher chacha20-poly1305 needs --key-file"),
    ("-l 10.42.42.1 -s 0.0.0.0 --cipher rot13", "invalid choice: 'rot13'"),
    ("-l 10.42.42.2 -c " + ",".join(f"192.0.2.{i}:192.0.2.1" for i in range(2, 19)), "at most 16 paths"),
    ("-l 10.42.42.1 -s 0.0.0.0 --queue-target -5", "must be more than 0 and at most 1000 ms"),
    ("-l 10.42.42.1 -s 0.0.0.0 --queue-target 2000", "must be more than 0 and at most 1000 ms"),
    ("-l 10.42.42.1 -s 0.0.0.0 --queue-target soon", "'soon' is not a number of milliseconds"),
    ("-l 10.42.42.1 -s 0.0.0.0 --rate 6M", "expected PATH=RATE"),
    ("-l 10.42.42.1 -s 0.0.0.0 --rate 16=6M", "path: 16 is out of range 0-15"),
    ("-l 10.42.42.1 -s 0.0.0.0 --rate 1=6X", "'6X' is not a rate in bit/s"),
    ("-l 10.42.42.1 -s 0.0.0.0 --rate 1=100k", "at least 128 kbit/s"),
    ("-l 10.42.42.1 -s 0.0.0.0 --rate 1=nan", "'nan' is not a rate"),
    ("-l 10.42.42.1 -s 0.0.0.0 --rate 1=2e12", "below 1 Tbit/s"),
    ("-l 10.42.42.1 -s 0.0.0.0 --rate 1=6M --rate 1=2M", "path 1 is given more than one rate"),
]


@pytest.mark.parametrize("cmdline,message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_exit_2(capsys, cmdline, message):
    with pytest.raises(SystemExit) as e:
        main(shlex.split(cmdline))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("multitun: error: "), err
    assert message in err


def run_cli(args, ns=None, **kw):
    cmd = [sys.executable, "-m", "multitun", *args]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kw)


def assert_one_line_error(proc, message):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_bad_input_from_a_real_process():
    assert_one_line_error(run_cli(["-l", "10.42.42.1", "-s", "0.0.0.0", "-c", "1.2.3.4:5.6.7.8"]),
                          "not allowed with")


def test_needs_root_or_cap_net_admin():
    # Without CAP_NET_ADMIN (dropped from root's bounding set, or not root at
    # all): the one-line error, not a PermissionError traceback.
    args = ["-l", "10.42.42.1", "-s", "127.0.0.1", "-p", "5678"]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
               sys.executable, "-m", "multitun", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    else:
        proc = run_cli(args)
    assert_one_line_error(proc, "needs root or CAP_NET_ADMIN to create a TUN device")


@requires_root
def test_port_in_use(bed):
    with bed.socket(bed.server) as taken:
        taken.bind(("0.0.0.0", 5678))
        proc = run_cli(["-l", "10.42.42.1", "-s", "0.0.0.0", "-p", "5678"], ns=bed.server)
    assert_one_line_error(proc, "UDP port 5678 on 0.0.0.0 is already in use")
    # And nothing is left behind: no TUN device in the namespace.
    assert "multitun" not in subprocess.run(
        ["ip", "netns", "exec", bed.server, "ip", "-o", "link"], capture_output=True, text=True).stdout


def test_paths_by_interface_name_and_pattern():
    cfg = config("-l 10.42.42.2 -c wwan0:203.0.113.1,wlan0:[2001:db8::1],"
                 "wwan*:203.0.113.1,192.0.2.2:192.0.2.1,[2001:db8::2]:[2001:db8::1]")
    name, name6, pattern, pair, pair6 = cfg.paths
    assert (name.local, name.interface, str(name.remote)) == (None, "wwan0", "203.0.113.1")
    assert not name.is_pattern and str(name) == "wwan0 -> 203.0.113.1"
    assert name6.interface == "wlan0" and name6.remote.version == 6
    assert pattern.is_pattern and pattern.interface == "wwan*"
    assert str(pair.local) == "192.0.2.2" and pair.interface is None and not pair.is_pattern
    assert pair6.local.version == 6
    assert cfg.outer_families == {4, 6}
