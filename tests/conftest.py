import os

import pytest

from multitun.lab import Bed, TunnelPair

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices")


@pytest.fixture
def bed():
    with Bed(2) as b:
        yield b


@pytest.fixture
def tunnel(bed, tmp_path):
    with TunnelPair(bed, tmp_path) as pair:
        pair.wait_carrying()
        yield pair
