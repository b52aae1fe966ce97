"""Shared fixtures."""

import pytest

from wadi_core.profiles import get_profile


@pytest.fixture(scope="module")
def smoke_profile(tmp_path_factory):
    """The smoke profile, its artifacts trained into (and loaded from) a temporary data directory for the whole
    module, never the repository's ``data/``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WADI_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        mp.delenv("WADI_FRESH", raising=False)
        mp.delenv("WADI_NO_TRAIN", raising=False)
        yield get_profile("smoke")
