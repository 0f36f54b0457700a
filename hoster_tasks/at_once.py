"""Two independent pieces of work at the same time, neither lost: the pattern behind "both sides at once"."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")


def at_once(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """`first()` here and `second()` in a thread, at the same time (two hosts' commands, or ZFS work that does
    not depend on each other: the slower sets the pace). Both always run to their end; then the first's error
    is raised, else the second's."""
    with ThreadPoolExecutor(1, thread_name_prefix="at-once") as pool:
        later = pool.submit(second)
        try:
            a = first()
        finally:
            wait([later])
        return a, later.result()
