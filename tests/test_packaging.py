"""The wheel as users get it: built in one fresh venv, installed in another."""

import subprocess
import venv
from pathlib import Path

import pytest

from multitun import __version__

ROOT = Path(__file__).resolve().parent.parent


def run(*argv, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    builder, user = tmp / "build-venv", tmp / "user-venv"
    for env in (builder, user):
        venv.create(env, with_pip=True)
    run(builder / "bin/python", "-m", "pip", "install", "-q", "build")
    # sdist first, then the wheel from the unpacked sdist: the sdist must be complete.
    run(builder / "bin/python", "-m", "build", "--outdir", tmp / "dist", ROOT)
    wheels = list((tmp / "dist").glob("multitun-*.whl"))
    sdists = list((tmp / "dist").glob("multitun-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    run(user / "bin/python", "-m", "pip", "install", "-q", wheels[0])
    return user, sdists[0]


def test_help_and_version(installed):
    user, _ = installed
    assert "--server_listen_addr" in run(user / "bin/multitun", "--help").stdout
    assert run(user / "bin/multitun", "--version").stdout.strip() == f"multitun {__version__}"


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


def test_sdist_has_the_sources(installed):
    import tarfile
    _, sdist = installed
    with tarfile.open(sdist) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"_fastpath.pyx", "_fastpath.pyi", "_testing.pyx", "engine.pxi", "header.pxd",
            "linux.pxd", "py.typed",
            "multitun@.service", "multitun-fleet@.service", "peers.pxi", "routes.pxd",
            "LICENSE"} <= names
