"""Handlers for the benchmark chain; the Celery peer runs the same two functions."""

from __future__ import annotations


def add_two(value: int) -> int:
    return value + 2


def double(value: int) -> int:
    return value * 2
