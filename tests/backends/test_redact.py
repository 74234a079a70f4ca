"""redact_url: a store URL fit to show, without its password or its options."""

from __future__ import annotations

import pytest

from bach.backends import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:secret@h:6379/0?x=1", "redis://user:***@h:6379/0"),
        ("rediss://:secret@h/1", "rediss://:***@h/1"),
        (
            "redis://secret@h:6379",
            "redis://***@h:6379",
        ),  # redis-py: a lone credential is a password
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),  # the last "@" ends the credentials
        ("redis://u:p/s?s#x@h/0?prefix=b", "redis://u:***@h/0"),
        ("redis://h:6379/0?prefix=a&password=x", "redis://h:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("sqlite:///.bach/bach.db?synchronous=normal", "sqlite:///.bach/bach.db"),
        ("sqlite:////abs/a@b.db", "sqlite:////abs/a@b.db"),
        ("memory://", "memory://"),
        ("nonsense", "nonsense"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redacted_urls_never_hold_the_password() -> None:
    for url in ("redis://app:hunter2@db:6379/0", "redis://hunter2@db", "rediss://:hunter2@db/3"):
        assert "hunter2" not in redact_url(url)
