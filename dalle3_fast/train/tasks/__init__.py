"""Built-in tasks, registered on import, and the lookup of a task by its config name."""
from __future__ import annotations

import dataclasses
import importlib

from ..config import ConfigError, build_dataclass
from ..task import TASKS, Task, TaskContext
from . import captioner, decoder, unet, vae  # noqa: F401  (register the built-in tasks)


def resolve_task(name: str) -> type[Task]:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"config key 'task': cannot import {name!r} ({exc})") from exc
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"config key 'task': {name!r} is not a Task subclass")
        return cls
    if name not in TASKS:
        raise ConfigError(f"config key 'task' is {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                          "(or give 'package.module:ClassName')")
    return TASKS[name]


def build_task(name: str, options: dict, ctx: TaskContext) -> Task:
    cls = resolve_task(name)
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    return cls(build_dataclass(cls.Options, options, prefix="task_options."), ctx)
