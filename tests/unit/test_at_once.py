"""at_once (hoster_tasks/at_once.py): the two sides' commands at the same time, each run to its end, errors not lost."""

from __future__ import annotations

import threading

import pytest

from hoster_tasks.at_once import at_once


def test_both_run_at_the_same_time() -> None:
    second_started = threading.Event()

    def first() -> str:
        assert second_started.wait(5), "second did not run while first was running"
        return "a"

    def second() -> str:
        second_started.set()
        return "b"

    assert at_once(first, second) == ("a", "b")


def test_a_failing_first_still_lets_the_second_finish_then_raises() -> None:
    done: list[str] = []
    release = threading.Event()

    def first() -> None:
        raise ValueError("first failed")

    def second() -> None:
        release.wait(0.2)  # still running when first has failed
        done.append("second")

    with pytest.raises(ValueError, match="first failed"):
        at_once(first, second)
    assert done == ["second"]


def test_a_failing_second_is_raised_after_the_first_finished() -> None:
    done: list[str] = []

    def second() -> None:
        raise KeyError("second failed")

    with pytest.raises(KeyError, match="second failed"):
        at_once(lambda: done.append("first"), second)
    assert done == ["first"]
