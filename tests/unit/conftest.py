"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No HOSTER_* variable from the calling environment leaks into a test."""
    for key in list(os.environ):
        if key.upper().startswith("HOSTER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOSTER_NODE_NAME", "node-a")
    yield
