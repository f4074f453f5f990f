"""Shared test helpers: where the reference fixtures live, and a skip when they are absent."""
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The fused kernels' tests check every autotuning candidate directly (tests/test_kernels.py), so the autotuner
# itself, which compiles and times every candidate for each new row count (minutes on a GPU), is left out here
# unless asked for (SRN_KERNELS_AUTOTUNE=1).
os.environ.setdefault("SRN_KERNELS_AUTOTUNE", "0")
sys.path.insert(0, str(ROOT))

FIXTURES = pathlib.Path(os.environ.get("SRN_REFERENCE_FIXTURES",
                                       ROOT.parent / "shared" / "fixtures" / "reference"))


@pytest.fixture
def reference_fixtures():
    """Path to the reference fixtures; skips the test with the reason when they are not there."""
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set SRN_REFERENCE_FIXTURES)")
    return FIXTURES
