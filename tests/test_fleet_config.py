"""A fleet server's peers in its config file and on its command line: what
is taken, and every bad input refused in one line with exit status 2."""

import ipaddress

import pytest

from multitun import config
from multitun.cli import build_parser, main, merge_config_file
from multitun.errors import ConfigError
from multitun.keyfile import generate_key
from multitun.peerconfig import PeerSpec, check_peers, read_peers

SERVER = ["-l", "10.42.42.1", "-s", "0.0.0.0"]


@pytest.fixture
def keys(tmp_path):
    """Key files a, b and c (mode 0600); the same key as a in 'a_again'."""
    out = {}
    for name in ("a", "b", "c"):
        out[name] = tmp_path / f"{name}.key"
        out[name].write_text(generate_key() + "\n")
        out[name].chmod(0o600)
    out["a_again"] = tmp_path / "a_again.key"
    out["a_again"].write_text(out["a"].read_text())
    out["a_again"].chmod(0o600)
    out["open"] = tmp_path / "open.key"
    out["open"].write_text(generate_key())
    out["open"].chmod(0o644)
    return out


def table(name, key, *ips):
    quoted = ", ".join(f'"{ip}"' for ip in ips)
    return f'[[peer]]\nname = "{name}"\nkey_file = "{key}"\nallowed_ips = [{quoted}]\n'


def load(tmp_path, toml, extra=()):
    path = tmp_path / "server.toml"
    path.write_text(toml)
    argv = ["--config", str(path), *SERVER, *extra]
    parser = build_parser()
    args = parser.parse_args(argv)
    merge_config_file(args, parser, argv)
    from multitun.cli import config_from_args
    return config_from_args(args)


def test_peers_from_the_file(tmp_path, keys):
    cfg = load(tmp_path, table("robot7", keys["a"], "10.42.42.7/32", "fd42::7/128")
               + table("robot8", keys["b"], "10.42.42.8"))
    assert [p.name for p in cfg.peers] == ["robot7", "robot8"]
    assert cfg.peers[0].allowed_ips == (ipaddress.ip_network("10.42.42.7/32"),
                                        ipaddress.ip_network("fd42::7/128"))
    assert cfg.peers[1].allowed_ips == (ipaddress.ip_network("10.42.42.8/32"),)
    assert cfg.keyed and cfg.peers_file == tmp_path / "server.toml"
    assert cfg.effective_mtu == 1440  # sealed: 16 bytes less for the tag


def test_peers_on_the_command_line_and_the_same_in_the_file(tmp_path, keys):
    argv = [*SERVER, "--peer", "robot7", str(keys["a"]), "10.42.42.7/32,fd42::7/128"]
    from multitun.cli import config_from_args
    cli = config_from_args(build_parser().parse_args(argv))
    from_file = load(tmp_path, table("robot7", keys["a"], "10.42.42.7/32", "fd42::7/128"))
    assert cli.peers == from_file.peers
    assert cli.peers_file is None  # nothing for SIGHUP to read again


def test_command_line_peers_replace_the_files(tmp_path, keys):
    cfg = load(tmp_path, table("robot7", keys["a"], "10.42.42.7"),
               extra=["--peer", "robot9", str(keys["b"]), "10.42.42.9"])
    assert [p.name for p in cfg.peers] == ["robot9"] and cfg.peers_file is None


BAD_TABLES = [
    (lambda k: table("robot7", k["a"], "10.42.42.7") + table("robot7", k["b"], "10.42.42.8"),
     "peer 'robot7' is defined twice"),
    (lambda k: table("robot7", k["a"], "10.42.42.0/24") + table("robot8", k["b"], "10.42.42.8"),
     "peers 'robot7' and 'robot8' overlap: 10.42.42.0/24 and 10.42.42.8/32"),
    (lambda k: table("robot7", k["a"], "fd42::/64") + table("robot8", k["b"], "fd42::8/128"),
     "peers 'robot7' and 'robot8' overlap: fd42::/64 and fd42::8/128"),
    (lambda k: table("robot7", k["a"], "10.42.42.7") + table("robot8", k["a_again"], "10.42.42.8"),
     "peers 'robot7' and 'robot8' have the same key"),
    (lambda k: table("robot7", str(k["a"]) + ".missing", "10.42.42.7"),
     "peer 'robot7': key file"),
    (lambda k: table("robot7", k["open"], "10.42.42.7"),
     "peer 'robot7': key file"),
    (lambda k: table("robot 7", k["a"], "10.42.42.7"), "name 'robot 7'"),
    (lambda k: table("robot7", k["a"]), "peer 'robot7': allowed_ips must list at least one"),
    (lambda k: table("robot7", k["a"], "10.42.42.7/24"),
     "peer 'robot7': allowed_ips: 10.42.42.7/24 has host bits set"),
    (lambda k: table("robot7", k["a"], "10.42.42.300"), "peer 'robot7': allowed_ips:"),
    (lambda k: f'[[peer]]\nname = "robot7"\nkey_file = "{k["a"]}"\n', "a peer needs allowed_ips"),
    (lambda k: table("robot7", k["a"], "10.42.42.7") + 'colour = "red"\n',
     "unknown key 'colour'"),
    (lambda k: 'peer = "robot7"\n', "peer: expected [[peer]] tables"),
]


@pytest.mark.parametrize("make,message", BAD_TABLES, ids=[b[1][:40] for b in BAD_TABLES])
def test_bad_peers_one_line_exit_2(tmp_path, capsys, keys, make, message):
    path = tmp_path / "bad.toml"
    path.write_text(make(keys))
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path), *SERVER])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("multitun: error: "), err
    assert message in err, err


@pytest.mark.parametrize("argv,message", [
    (["-l", "10.42.42.2", "-c", "192.0.2.2:192.0.2.1", "--peer", "r", "{a}", "10.42.42.7"],
     "peers ([[peer]] or --peer) are a server's"),
    ([*SERVER, "--key-file", "{a}", "--peer", "r", "{b}", "10.42.42.7"],
     "give --key-file (one client) or peers"),
    ([*SERVER, "--peer", "r", "{a}", "10.42.42.7", "--peer", "s", "{a_again}", "10.42.42.8"],
     "peers 'r' and 's' have the same key"),
    ([*SERVER, "--peer", "r", "{a}", "bogus"], "peer 'r': allowed_ips:"),
    ([*SERVER, "--peer", "r", "{a}"], "expected 3 arguments"),
])
def test_bad_peer_options_one_line_exit_2(capsys, keys, argv, message):
    with pytest.raises(SystemExit) as e:
        main([a.format(**keys) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_reload_reads_the_peers_again_and_checks_them(tmp_path, keys):
    path = tmp_path / "server.toml"
    path.write_text(table("robot7", keys["a"], "10.42.42.7") + table("robot8", keys["b"],
                                                                      "10.42.42.8"))
    assert [p.name for p in read_peers(path, config.MAX_PEERS)] == ["robot7", "robot8"]
    path.write_text(table("robot7", keys["a"], "10.42.42.7") + table("robot8", keys["a_again"],
                                                                      "10.42.42.8"))
    with pytest.raises(ConfigError, match=f"{path}: peers 'robot7' and 'robot8' have the same"):
        read_peers(path, config.MAX_PEERS)


def test_at_most_max_peers():
    peers = tuple(PeerSpec(f"r{i}", "k", (ipaddress.ip_network(f"10.0.{i // 256}.{i % 256}"),),
                           i.to_bytes(32, "big")) for i in range(3))
    check_peers(peers, 3)
    with pytest.raises(ConfigError, match="at most 2 peers, got 3"):
        check_peers(peers, 2)


def test_nested_prefixes_of_one_peer_are_its_own():
    net = ipaddress.ip_network
    check_peers((PeerSpec("a", "k", (net("10.0.0.0/8"), net("10.1.0.0/16")), b"1"),
                 PeerSpec("b", "k", (net("11.0.0.0/8"),), b"2")), 10)
    with pytest.raises(ConfigError, match="'a' and 'b' overlap: 10.0.0.0/8 and 10.1.2.0/24"):
        check_peers((PeerSpec("a", "k", (net("10.0.0.0/8"), net("10.1.0.0/16")), b"1"),
                     PeerSpec("b", "k", (net("10.1.2.0/24"),), b"2")), 10)


def test_example_file_is_valid(tmp_path, keys):
    from pathlib import Path
    example = (Path(__file__).parent.parent / "examples" / "fleet.toml").read_text()
    example = example.replace("/etc/multitun/robot7.key", str(keys["a"]))
    cfg = load(tmp_path, example.replace("/etc/multitun/robot8.key", str(keys["b"])))
    assert [p.name for p in cfg.peers] == ["robot7", "robot8"] and cfg.is_server
