"""Bach: a durable orchestration engine for pipelines of independent services."""

from __future__ import annotations

__version__ = "0.1.0"


class Fatal(Exception):
    """Raised by a handler, fails its job for good: no retry can fix what it reports."""


__all__ = ["Fatal", "__version__"]
