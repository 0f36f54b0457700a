"""What a tier of tests needs from the machine: skip without it, except under CI=true."""

from __future__ import annotations

import os

import pytest


def require(what: str, problems: list[str]) -> None:
    """Skip when `problems`; under CI=true fail instead: CI must never pass by skipping."""
    if not problems:
        return
    message = f"{what} unavailable: " + "; ".join(problems)
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(message)
