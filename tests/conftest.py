"""Shared pytest configuration.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE=ci``): example counts are set per test
with ``@settings(max_examples=...)`` and are not lowered by either profile.
"""
import os

from hypothesis import HealthCheck, settings

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
