"""Hypothesis profiles of the model tests: ``ci`` (the default: short, for every run of the
suite), ``dev`` (a closer look while changing the write path, minutes) and ``soak`` (long;
``make soak`` selects it with HYPOTHESIS_PROFILE=soak)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # steps cross a real NATS and a real cache process
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None,  # a run is independent of earlier ones (CI has no shared database)
}
settings.register_profile("ci", max_examples=12, stateful_step_count=25, **_COMMON)
settings.register_profile("dev", max_examples=60, stateful_step_count=60, **_COMMON)
settings.register_profile("soak", max_examples=400, stateful_step_count=80, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
