"""Hypothesis profiles of the fuzz tier.

"ci" (the default): a fixed number of examples per test, sized so the whole tier takes about two
minutes on a 2-core CPU machine, derandomized so every CI run draws the same examples, and no
deadline (the first call of a Triton kernel in the interpreter, or of a native op, is slow).
"long": ``FASTDIFF_FUZZ=long pytest tests/fuzz`` draws many more examples (and larger sizes, see
strategies.SIZES) from a random seed; hypothesis prints the seed and a reproducer for any failure.
"""

from __future__ import annotations

import os
import tempfile

try:
    from hypothesis import HealthCheck, settings
    from hypothesis.configuration import set_hypothesis_home_dir
except ImportError:  # the test modules skip with the reason (a machine set up without the test extra)
    settings = None

if settings is not None:
    # Hypothesis' files (its example database in the long profile, the patches it writes for failing
    # examples) go outside the checkout.
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "fastdiff-hypothesis"))

    # Each test scales its max_examples from these by a per-test factor (see examples()).
    settings.register_profile(
        "ci",
        max_examples=20,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    settings.register_profile(
        "long",
        max_examples=600,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    PROFILE = "long" if os.environ.get("FASTDIFF_FUZZ", "") == "long" else "ci"
    settings.load_profile(PROFILE)
else:
    PROFILE = "none (hypothesis is not installed)"


def pytest_report_header(config):
    return f"fastdiff fuzz tier: hypothesis profile {PROFILE!r} (FASTDIFF_FUZZ=long for the long one)"
