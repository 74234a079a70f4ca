"""Handlers for the benchmark chain; the Celery peer runs the same two functions."""

from __future__ import annotations


def add_two(value: int) -> int:
    return value + 2


def double(value: int) -> int:
    return value * 2


def sleep_ms(job: dict[str, int]) -> int:
    """A job that takes ``ms`` milliseconds of wall time (the scaling benchmark's)."""
    import time

    time.sleep(job["ms"] / 1000)
    return job["i"]
