"""What a test does when a service of its tier is missing (the oracle's interpreter, the ``weed``
binary, Chromium, TensorFlow): it skips on a developer's machine and fails under ``CI``, which
runs every tier (``.ci/run`` sets ``CI=true``)."""

from __future__ import annotations

import os

import pytest


def missing_service(what: str) -> None:
    """Skip the calling test, or fail it under ``CI``, saying what is missing."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {what}")
    pytest.skip(what)
