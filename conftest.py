import os

# 8 virtual CPU devices for the sharding tests; must be set before JAX is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings  # noqa: E402

# CI: derandomised and bounded. Thorough: `HYPOTHESIS_PROFILE=thorough pytest`.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=6, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running checks, skipped by .ci/run (run with `pytest -m slow`)")
