"""Loading code named by text: ``module:function`` handlers from scores."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from bach.errors import BachError


def load_object(ref: str, base_dir: Path | None = None, field: str = "handler") -> Any:
    """Import ``module:attr``, looking in ``base_dir`` (a score's folder) first."""
    module_name, _, attr = ref.partition(":")
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BachError(field, f"cannot import {module_name!r} for {ref!r}: {exc}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BachError(field, f"{module_name!r} has no attribute {attr!r}") from None
    return obj
