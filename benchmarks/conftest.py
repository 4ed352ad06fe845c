import os
import shlex

import pytest

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices")


def pytest_addoption(parser):
    parser.addoption(
        "--compare-cmd", metavar="CMD",
        help="also run the end-to-end scenarios with this tunnel, started with the original "
             "C++ tool's command line (CMD -l ADDR -s 0.0.0.0 -p PORT / CMD -l ADDR -c PAIRS "
             "-p PORT), on the same bed, for side-by-side figures")
    parser.addoption(
        "--baseline-python", metavar="PYTHON",
        help="the Python of a virtual environment with another version of multitun "
             "installed, for benchmarks/test_versions.py")


@pytest.fixture
def baseline_python(request):
    python = request.config.getoption("--baseline-python")
    if not python:
        pytest.skip("no --baseline-python: nothing to compare this version with")
    return python


def pytest_generate_tests(metafunc):
    if "tunnel_cmd" in metafunc.fixturenames:
        cmd = metafunc.config.getoption("--compare-cmd")
        params = [None] + ([shlex.split(cmd)] if cmd else [])
        metafunc.parametrize("tunnel_cmd", params, ids=["multitun"] + (["compare"] if cmd else []),
                             scope="module")
