"""Keys: `multitun genkey`, --key-file and its checks (no root needed)."""

import base64
import stat

import pytest

from multitun.cli import build_parser, config_from_args, main
from multitun.keyfile import generate_key, load_key

SERVER = ["-l", "10.42.42.1", "-s", "0.0.0.0"]


def key_file(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "key"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_genkey_prints_one_new_key(capsys):
    assert main(["genkey"]) == 0
    first = capsys.readouterr().out
    main(["genkey"])
    second = capsys.readouterr().out
    assert first.endswith("\n") and first.count("\n") == 1 and len(first) == 45
    assert len(base64.b64decode(first.strip(), validate=True)) == 32
    assert first != second


def test_genkey_takes_no_arguments(capsys):
    assert main(["genkey", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_key_file_read(tmp_path):
    text = generate_key()
    assert load_key(key_file(tmp_path, text + "\n")) == base64.b64decode(text)


def test_key_turns_sealing_on_and_shrinks_the_mtu(tmp_path):
    path = key_file(tmp_path, generate_key())
    keyed = config_from_args(build_parser().parse_args(SERVER + ["--key-file", str(path)]))
    plain = config_from_args(build_parser().parse_args(SERVER))
    assert keyed.key is not None and plain.key is None
    assert (plain.effective_mtu, keyed.effective_mtu) == (1456, 1440)
    assert "key=" not in repr(keyed)  # never in a log line or traceback


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_key_file_others_may_access_is_refused(tmp_path, capsys, mode):
    path = key_file(tmp_path, generate_key(), mode)
    with pytest.raises(SystemExit) as e:
        main(SERVER + ["--key-file", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"key file {path}: readable or writable by other users (mode {mode:04o})" in err


BAD_KEYS = ["", "not base64!", base64.b64encode(bytes(31)).decode(),
            base64.b64encode(bytes(33)).decode(), generate_key() + generate_key(), "\xff\xfe"]


@pytest.mark.parametrize("text", BAD_KEYS, ids=range(len(BAD_KEYS)))
def test_malformed_key_is_refused(tmp_path, capsys, text):
    path = key_file(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        main(SERVER + ["--key-file", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a multitun key" in err


def test_missing_key_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(SERVER + ["--key-file", str(tmp_path / "nope")])
    assert e.value.code == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_key_file_from_config_file_is_checked_too(tmp_path, capsys):
    path = key_file(tmp_path, generate_key(), 0o644)
    config = tmp_path / "m.toml"
    config.write_text(f'key_file = "{path}"\n')
    with pytest.raises(SystemExit) as e:
        main(SERVER + ["--config", str(config)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{config}: key_file: key file {path}" in err
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # we refuse; we do not fix it


def test_mtu_bounded_by_what_a_sealed_datagram_can_carry(tmp_path, capsys):
    # 65507 bytes of UDP payload = 16 of header + the packet + 16 of tag.
    key = ["--key-file", str(key_file(tmp_path, generate_key()))]
    largest = config_from_args(build_parser().parse_args(SERVER + key + ["--mtu", "65475"]))
    assert largest.effective_mtu == 65475
    with pytest.raises(SystemExit) as e:
        main(SERVER + key + ["--mtu", "65476"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too large with --key-file" in err and "at most 65475" in err
