"""The wheel as users get it: built in one fresh venv, installed in another."""

import os
import subprocess
import venv
from pathlib import Path

import pytest

from multitun import __version__

ROOT = Path(__file__).resolve().parent.parent


def run(*argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True,
                          timeout=600, **kw)


def static_libcrypto(tmp: Path) -> Path:
    """A prefix for MULTITUN_LIBCRYPTO (setup.py) holding the system's static
    libcrypto: the wheel is linked as released wheels are, without building
    the OpenSSL that packaging/libcrypto.sh pins (the headers are the system's)."""
    archive = run("gcc", "-print-file-name=libcrypto.a").stdout.strip()
    if not os.path.isabs(archive):
        pytest.skip("no static libcrypto.a (Debian: libssl-dev) to link the wheel with")
    prefix = tmp / "libcrypto"
    (prefix / "include").mkdir(parents=True)
    (prefix / "lib").mkdir()
    (prefix / "lib/libcrypto.a").symlink_to(archive)
    return prefix


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    builder, user = tmp / "build-venv", tmp / "user-venv"
    for env in (builder, user):
        venv.create(env, with_pip=True)
    run(builder / "bin/python", "-m", "pip", "install", "-q", "build")
    # sdist first, then the wheel from the unpacked sdist: the sdist must be complete.
    run(builder / "bin/python", "-m", "build", "--outdir", tmp / "dist", ROOT,
        env={**os.environ, "MULTITUN_LIBCRYPTO": str(static_libcrypto(tmp))})
    wheels = list((tmp / "dist").glob("multitun-*.whl"))
    sdists = list((tmp / "dist").glob("multitun-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    run(user / "bin/python", "-m", "pip", "install", "-q", wheels[0])
    return user, sdists[0]


def test_help_and_version(installed):
    user, _ = installed
    assert "--server_listen_addr" in run(user / "bin/multitun", "--help").stdout
    version = run(user / "bin/multitun", "--version").stdout.splitlines()
    assert version[0] == f"multitun {__version__}" and version[1].startswith("libcrypto: OpenSSL")


def test_man_page_installed(installed):
    user, _ = installed
    page = (user / "share/man/man8/multitun.8").read_text()
    assert page.startswith('.TH MULTITUN "8"')
    assert "multi\\-path duplicating tunnel" in page and "\\-\\-client_endpoints" in page


def test_bash_completion_installed(installed):
    user, _ = installed
    script = user / "share/bash-completion/completions/multitun"
    assert "--client_endpoints" in script.read_text()
    # It loads in bash and completes an option.
    out = run("bash", "-c", f"source {script}; COMP_WORDS=(multitun --client_e); COMP_CWORD=1; "
              "_shtab_multitun; echo ${COMPREPLY[@]}")
    assert "--client_endpoints" in out.stdout


def test_compiled_module_imports(installed, tmp_path):
    user, _ = installed
    out = run(user / "bin/python", "-c",
              "import multitun._fastpath as f; print(f.CONSTANTS['HEADER_LEN'])", cwd=tmp_path)
    assert out.stdout.strip() == "16"


def test_the_wheel_carries_its_own_libcrypto(installed, tmp_path):
    """Linked statically, libcrypto is not a dependency of the data plane, and
    none of its symbols is exported: the Python process's own libcrypto (loaded
    here by ssl and hashlib, first) and the data plane's never bind to each
    other's, and both AEADs still give what `cryptography` gives."""
    user, _ = installed
    for module in (user / "lib").glob("python3*/site-packages/multitun/_*.so"):
        dynamic = run("readelf", "--dynamic", "--dyn-syms", "--wide", module).stdout
        assert "libcrypto" not in dynamic and " EVP_" not in dynamic, module
    check = (
        "import ssl, hashlib, os\n"
        "from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305\n"
        "from multitun import _testing\n"
        "from multitun.ciphers import CIPHERS\n"
        "key, data, ad = os.urandom(32), os.urandom(1400), os.urandom(16)\n"
        "nonce = bytes(4) + (7).to_bytes(8, 'big')\n"
        "for name, ref in (('aes-256-gcm', AESGCM), ('chacha20-poly1305', ChaCha20Poly1305)):\n"
        "    assert _testing.aead_seal(key, 7, ad, data, CIPHERS[name]) == "
        "ref(key).encrypt(nonce, data, ad), name\n"
        "print('ok')\n")
    assert run(user / "bin/python", "-c", check, cwd=tmp_path).stdout.strip() == "ok"


def test_sdist_has_the_sources(installed):
    import tarfile
    _, sdist = installed
    with tarfile.open(sdist) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"_fastpath.pyx", "_fastpath.pyi", "_testing.pyx", "engine.pxi", "header.pxd",
            "linux.pxd", "py.typed",
            "multitun@.service", "multitun-fleet@.service", "peers.pxi", "routes.pxd",
            "LICENSE"} <= names
