import os

import pytest

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices")
