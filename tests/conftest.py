"""Shared pytest configuration.

Rules are strict in every test (``STRUCTPRUNE_STRICT_RULES=1``, inherited by subprocesses): a rule
that raises or returns a wrongly shaped label fails the test instead of silently freezing its
channels. A test that uses a failing rule on purpose is marked ``@pytest.mark.lenient_rules``.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE=ci``): example counts are set per test
with ``@settings(max_examples=...)`` and are not lowered by either profile.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

from structprune.ops.registry import STRICT_ENV, strict_rules

settings.register_profile(
    "dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # same examples on every CI run; failures print a reproducible blob
    database=None,
    print_blob=True,
)
# CI (CI=true) replays the same examples every run; locally hypothesis explores new ones
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config):
    config.addinivalue_line("markers", "lenient_rules: the test makes a rule fail on purpose; failing rules "
                                       "freeze their channels as outside the tests")


@pytest.fixture(scope="session", autouse=True)
def _strict_rules_everywhere():
    previous = os.environ.get(STRICT_ENV)
    os.environ[STRICT_ENV] = "1"
    yield
    if previous is None:
        os.environ.pop(STRICT_ENV, None)
    else:
        os.environ[STRICT_ENV] = previous


@pytest.fixture(autouse=True)
def _lenient_rules_when_marked(request):
    if request.node.get_closest_marker("lenient_rules") is None:
        yield
        return
    with strict_rules(False):
        yield
