"""Shared test settings."""

from __future__ import annotations

import os

from hypothesis import settings

# CI runs the property-based tests with a fixed seed so a landing never depends on luck;
# developers get fresh examples on every run.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
