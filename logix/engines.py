"""Training engines that wrap a model (DeepSpeed's engine, say): how `run.watch` attaches to them.

The core imports no adapter. An adapter registers an attach function under the engine's class
name: by calling `register` when it is imported, and through the `logix.engines` entry point
group (pyproject.toml), which `attacher_for` loads on first sight of such an engine, so that
`run.watch(engine)` attaches by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

GROUP = "logix.engines"

_attachers: dict[str, Callable[[Any, Any], None]] = {}


def register(type_name: str, attach: Callable[[Any, Any], None]) -> None:
    """attach(run, engine) will be called by run.watch(engine) for engines of this class name."""
    _attachers[type_name] = attach


def attacher_for(engine: Any) -> Callable[[Any, Any], None] | None:
    """The attach function registered for this object's class, loading its entry point if needed."""
    name = type(engine).__name__
    if name not in _attachers:
        for point in entry_points(group=GROUP, name=name):
            register(name, point.load())
            break
    return _attachers.get(name)
