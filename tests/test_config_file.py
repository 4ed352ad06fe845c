"""--config FILE: TOML equivalent to every option, options overriding it."""

import shlex

import pytest

from multitun.cli import build_parser, main, merge_config_file
from multitun.keyfile import generate_key

# (command-line options, the same in TOML): together they cover every option.
ROUND_TRIPS = [
    ("-l 10.42.42.1 -s 0.0.0.0", 'tun_listen_addr = "10.42.42.1"\nserver_listen_addr = "0.0.0.0"'),
    ("-l 10.42.42.2/30 -l fd42::2/64 -c 192.0.2.2:192.0.2.1,[2001:db8::2]:[2001:db8::1]",
     'tun_listen_addr = ["10.42.42.2/30", "fd42::2/64"]\n'
     'client_endpoints = ["192.0.2.2:192.0.2.1", "[2001:db8::2]:[2001:db8::1]"]'),
    ("-l 10.42.42.2 -c 192.0.2.2:192.0.2.1,198.51.100.2:198.51.100.1",
     'tun_listen_addr = "10.42.42.2"\nclient_endpoints = "192.0.2.2:192.0.2.1,198.51.100.2:198.51.100.1"'),
    ("-l 10.42.42.1 -s :: -p 6000 -t 7.5 -n", 'tun_listen_addr = "10.42.42.1"\n'
     'server_listen_addr = "::"\nserver_port = 6000\ntimeout = 7.5\nnonblocking = true'),
    ("-l 10.42.42.1 -s 0.0.0.0 --dev mt7 --mtu 1400 --probe-interval 0.2 --down-after 1",
     'tun_listen_addr = "10.42.42.1"\nserver_listen_addr = "0.0.0.0"\ndev = "mt7"\nmtu = 1400\n'
     'probe_interval = 0.2\ndown_after = 1'),
    ("-l 10.42.42.1 -s 0.0.0.0 --metrics [::1]:9100 --log-format json --low-latency "
     "--no-offload -vv --busy-poll 2000", 'tun_listen_addr = "10.42.42.1"\n'
     'server_listen_addr = "0.0.0.0"\nmetrics = "[::1]:9100"\nlog_format = "json"\n'
     'low_latency = true\noffload = false\nverbose = 2\nbusy_poll_us = 2000'),
    ("-l 10.42.42.1 -s 0.0.0.0 --key-file {key} --cipher chacha20-poly1305",
     'tun_listen_addr = "10.42.42.1"\nserver_listen_addr = "0.0.0.0"\nkey_file = "{key}"\n'
     'cipher = "chacha20-poly1305"'),
    ("-l 10.42.42.2 -c wwan0:203.0.113.1,'wwan*:203.0.113.1'",
     'tun_listen_addr = "10.42.42.2"\nclient_endpoints = ["wwan0:203.0.113.1", "wwan*:203.0.113.1"]'),
    ("-l 10.42.42.1 -s 0.0.0.0 --queue-target 25 --rate 1=6M --rate 0=500k",
     'tun_listen_addr = "10.42.42.1"\nserver_listen_addr = "0.0.0.0"\nqueue_target_ms = 25\n'
     'rate_caps = ["1=6M", "0=500k"]'),
    ("-l 10.42.42.1 -s 0.0.0.0 --peer robot7 {key} 10.42.42.7/32,fd42::7/128",
     'tun_listen_addr = "10.42.42.1"\nserver_listen_addr = "0.0.0.0"\n[[peer]]\n'
     'name = "robot7"\nkey_file = "{key}"\nallowed_ips = ["10.42.42.7/32", "fd42::7/128"]'),
]


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "key"
    path.write_text(generate_key() + "\n")
    path.chmod(0o600)
    return path


def from_file(tmp_path, toml, extra=()):
    path = tmp_path / "multitun.toml"
    path.write_text(toml)
    argv = ["--config", str(path), *extra]
    parser = build_parser()
    args = parser.parse_args(argv)
    merge_config_file(args, parser, argv)
    # Only the file knows where it is (SIGHUP reads its peers again).
    return {k: v for k, v in vars(args).items() if k not in ("config", "peers_file")}


@pytest.mark.parametrize("cmdline,toml", ROUND_TRIPS)
def test_every_option_round_trips(tmp_path, key, cmdline, toml):
    cli = {k: v for k, v in vars(build_parser().parse_args(shlex.split(cmdline.format(key=key)))).items()
           if k != "config"}
    assert from_file(tmp_path, toml.format(key=key)) == cli


def test_the_table_covers_every_option():
    dests = {a.dest for a in build_parser()._actions} - {"help", "version", "config"}
    covered = set()
    for _, toml in ROUND_TRIPS:
        top, _, tables = toml.partition("[[")
        covered |= {line.split(" = ")[0] for line in top.splitlines()}
        covered |= {tables.split("]]")[0]} - {""}  # [[peer]]: the --peer option
    assert covered == dests


def test_options_override_the_file(tmp_path):
    args = from_file(tmp_path, 'tun_listen_addr = "10.42.42.1"\nserver_listen_addr = "0.0.0.0"\n'
                               'server_port = 6000\nmtu = 1400', extra=["-p", "5678", "-l", "10.9.9.1"])
    assert args["server_port"] == 5678  # given, though equal to the default
    assert args["mtu"] == 1400
    assert [str(a) for a in args["tun_listen_addr"]] == ["10.9.9.1/24"]  # replaced, not added to


BAD = [
    ('server_prot = 5678', "unknown key 'server_prot' (did you mean 'server_port'?)"),
    ('server_port = 70000', "server_port: port: 70000 is out of range 1-65535"),
    ('server_port = true', "server_port: expected a string or a number, got True"),
    ('low_latency = "yes"', "low_latency: expected true or false, got 'yes'"),
    ('log_format = "xml"', "log_format: expected one of text, json, got 'xml'"),
    ('tun_listen_addr = ["10.42.42.1", "10.42.42.300"]', "'10.42.42.300' is not an IP address"),
    ('client_endpoints = "192.0.2.2"', "client_endpoints: path '192.0.2.2': expected local:server"),
    ('verbose = -1', "verbose: expected a count"),
    ('mtu = 1400\ndev = mt0', "(at line 2, column 7)"),
    ('mtu = [1400]', "mtu: expected a string or a number, got [1400]"),
    ('queue_target_ms = 0', "queue_target_ms: queue target: '0' must be more than 0"),
    ('rate_caps = ["1=6 parsecs"]', "rate_caps: rate '1=6 parsecs': '6 parsecs' is not a rate"),
]


@pytest.mark.parametrize("toml,message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_files_one_line_exit_2(tmp_path, capsys, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path), "-l", "10.42.42.1", "-s", "0.0.0.0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"multitun: error: {path}: "), err
    assert message in err


def test_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", str(tmp_path / "nope.toml")])
    assert e.value.code == 2
    assert "nope.toml: No such file or directory" in capsys.readouterr().err


def test_example_file_is_valid():
    from pathlib import Path
    example = Path(__file__).parent.parent / "examples" / "client.toml"
    parser = build_parser()
    argv = ["--config", str(example)]
    args = parser.parse_args(argv)
    merge_config_file(args, parser, argv)
    assert args.client_endpoints and args.tun_listen_addr
