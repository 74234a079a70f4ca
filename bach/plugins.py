"""Loading code named by text: ``module:function`` handlers from scores."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from bach.errors import BachError


def load_object(
    ref: str,
    base_dir: Path | None = None,
    field: str = "handler",
    *,
    fallback: Path | None = None,
) -> Any:
    """Import ``module:attr``, looking in ``base_dir`` (a score's folder) first, and in
    ``fallback`` when the module is found nowhere else."""
    module_name, _, attr = ref.partition(":")
    _search(base_dir)
    if fallback is not None and not _findable(module_name):
        _search(fallback)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BachError(field, f"cannot import {module_name!r} for {ref!r}: {exc}") from None
    obj = module
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BachError(field, f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def _search(folder: Path | None) -> None:
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def _findable(module_name: str) -> bool:
    """Whether the top package of ``module_name`` is on ``sys.path``, without importing it."""
    try:
        return importlib.util.find_spec(module_name.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


ENTRY_POINT_GROUP = "bach.plugins"


@dataclass
class Plugin:
    """What one plugin provides: commands by name, and score services by name."""

    name: str
    origin: str
    commands: list[type] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_dir: Path | None = None


@dataclass
class Found:
    plugins: list[Plugin] = field(default_factory=list)
    #: Plugins that could not be loaded: (name, reason).
    broken: list[tuple[str, str]] = field(default_factory=list)


def _from_object(name: str, origin: str, obj: Any) -> Plugin:
    from bach.commands import is_command

    commands = getattr(obj, "commands", None)
    if commands is None and inspect.ismodule(obj):
        commands = [
            value
            for value in vars(obj).values()
            if is_command(value) and value.__module__ == obj.__name__
        ]
    if commands is None and is_command(obj):
        commands = [obj]
    commands = list(commands or [])
    for cls in commands:
        if not is_command(cls):
            raise TypeError(f"{cls!r} is not a command (a class with an execute method)")
    services = dict(getattr(obj, "services", None) or {})
    module = inspect.getmodule(obj)
    base = Path(module.__file__).parent if module and module.__file__ else None
    return Plugin(name, origin, commands, services, base)


def discover(modules: Sequence[str] = (), base_dir: Path | None = None) -> Found:
    """Every installed plugin (entry-point group ``bach.plugins``) and the modules named
    (``module`` or ``module:attr``, looked up in ``base_dir`` first, then on ``sys.path``,
    then in the working folder). A plugin that fails to load is reported by name; the
    others still load."""
    found = Found()
    # The `bach` console script, unlike `python -m bach`, does not put the working folder
    # on sys.path, so `--plugin NAME` beside the user would not be found without this.
    cwd = Path.cwd()
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            found.plugins.append(
                _from_object(entry.name, f"entry point {entry.value}", entry.load())
            )
        except Exception as exc:
            found.broken.append((entry.name, f"{type(exc).__name__}: {exc}"))
    for ref in modules:
        try:
            obj = load_object(ref, base_dir, field="plugin", fallback=cwd)
            found.plugins.append(_from_object(ref, f"module {ref}", obj))
        except Exception as exc:
            reason = exc.reason if isinstance(exc, BachError) else f"{type(exc).__name__}: {exc}"
            found.broken.append((ref, reason))
    return found
