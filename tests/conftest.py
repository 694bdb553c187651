"""Shared fixtures. Imports neither torch nor matplotlib: one test proves eamet works without torch."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import eamet

# Property tests draw their data from a numpy RNG seeded by a hypothesis integer; examples stay modest
# so the whole suite runs in a few minutes on two cores. EAMET_HYPOTHESIS_PROFILE=thorough runs many more.
settings.register_profile(
    "eamet", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("EAMET_HYPOTHESIS_PROFILE", "eamet"))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A numpy generator seeded from the test's name, so every test has its own fixed data."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Restores eamet's kernel thread count after a test that changes it."""
    before = eamet.get_num_threads()
    try:
        yield
    finally:
        eamet.set_num_threads(0)  # back to the default (EAMET_NUM_THREADS or every CPU) ...
        if eamet.get_num_threads() != before:
            eamet.set_num_threads(before)  # ... unless the session had asked for another count
