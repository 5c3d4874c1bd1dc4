import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from forkd_harness import Daemon  # noqa: E402


@pytest.fixture
def daemon():
    d = Daemon("--shutdown-grace-ms", "1000")
    yield d
    d.cleanup()
