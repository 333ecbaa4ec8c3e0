"""Task registry: which function runs for which task name.

Light on purpose (standard library only): worker processes import it.

A task module declares its tasks with a :class:`Registry` (or a :class:`~lbmqtt.Node`,
which has one) or with the module-level :func:`task` decorator::

    from lbmqtt import Registry
    tasks = Registry()

    @tasks.task("HELLO")
    def hello(args, ctx):
        return f"Hello {args['firstName']} {args['lastName']} !"

A task function gets the task's JSON arguments first and, if it accepts a second
parameter (or one named ``ctx``), a :class:`TaskContext` for ``ctx.progress(percent)``.
It returns any JSON-serializable value. It runs in a worker process, so it must be a
module-level function that the worker can import by name.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

TASK_ATTR = "__lbmqtt_task__"
WORKER_ENV = "LBMQTT_WORKER"
# = protocol.TASK_NAME_PATTERN; not imported from there to keep worker start-up light
_TASK_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")


class TaskContext(Protocol):
    """What a running task can ask of lbmqtt."""

    task_id: str
    attempt: int
    user: str
    name: str
    priority: int

    def progress(self, percent: float) -> None:
        """Report progress, 0..100 (cheap: calls are coalesced)."""


STYLES = ("auto", "pyloadbalancer")
"""How a task function is called: ``auto`` = ``fn(args)`` or ``fn(args, ctx)``;
``pyloadbalancer`` = ``fn(task=args, arguments=kwargs_given_to_addTask)``."""


@dataclass(frozen=True)
class TaskEntry:
    """A registered task function and how to call it."""

    fn: Callable[..., Any]
    style: str = "auto"
    arguments: Mapping[str, Any] | None = None


def in_worker() -> bool:
    """True inside a worker process (daemon entry points do nothing there, so that a script
    without ``if __name__ == "__main__"`` can be imported by its workers)."""
    return os.environ.get(WORKER_ENV) == "1"


class Registry:
    """Maps task names to functions."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskEntry] = {}

    def task(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator registering a function as task ``name`` (default: the function name)."""

        def deco(fn: F) -> F:
            self.add_task(name or fn.__name__, fn)
            return fn

        return deco

    def add_task(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        style: str = "auto",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Register ``fn`` as the function of task ``name``.

        Args:
            style: how it is called (see :data:`STYLES`).
            arguments: with ``style="pyloadbalancer"``, the ``arguments`` it gets.

        Raises:
            TypeError: ``fn`` is not a module-level function (workers import it by name).
            ValueError: ``name`` is not a valid task name or is taken by another function.
        """
        if not _TASK_NAME_RE.match(name):
            raise ValueError(f"invalid task name {name!r}: letters, digits and _.:- only")
        if style not in STYLES:
            raise ValueError(f"unknown calling style {style!r}: one of {STYLES}")
        function_reference(fn)  # fails early with a clear message
        old = self._tasks.get(name)
        if old is not None and old.fn is not fn:
            raise ValueError(f"task {name!r} is already registered to {old.fn.__qualname__}")
        self._tasks[name] = TaskEntry(fn, style, dict(arguments) if arguments else None)
        with contextlib.suppress(AttributeError, TypeError):
            setattr(fn, TASK_ATTR, name)

    def remove_task(self, name: str) -> None:
        """Forget task ``name`` (no error if it is not registered)."""
        self._tasks.pop(name, None)

    def get(self, name: str) -> Callable[..., Any] | None:
        entry = self._tasks.get(name)
        return entry.fn if entry else None

    def entry(self, name: str) -> TaskEntry | None:
        return self._tasks.get(name)

    def entries(self) -> Iterator[tuple[str, TaskEntry]]:
        return iter(sorted(self._tasks.items()))

    def names(self) -> list[str]:
        """Sorted task names."""
        return sorted(self._tasks)

    def items(self) -> Iterator[tuple[str, Callable[..., Any]]]:
        return iter(sorted((n, e.fn) for n, e in self._tasks.items()))

    def update(self, other: Registry) -> None:
        for name, e in other.entries():
            self.add_task(name, e.fn, style=e.style, arguments=e.arguments)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)


_module_registry = Registry()


def task(name: str | None = None) -> Callable[[F], F]:
    """Module-level decorator: ``@lbmqtt.task("HELLO")`` marks a task function.

    ``lbmqtt node --tasks MODULE`` collects the functions so marked in MODULE.
    """
    return _module_registry.task(name)


def function_reference(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a module-level function, as a worker process imports it.

    Raises:
        TypeError: a lambda, a nested function or a non-function.
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not module or not qualname or "<" in qualname:
        raise TypeError(
            f"task functions must be module-level functions (worker processes import them "
            f"by name); got {fn!r}"
        )
    if module == "__main__":
        main = sys.modules["__main__"]
        path = getattr(main, "__file__", None)
        if not path:
            raise TypeError(
                f"{qualname} is defined in an interactive session; put task "
                "functions in a module or a .py file"
            )
        return f"{Path(path).resolve()}:{qualname}"
    return f"{module}:{qualname}"


def import_source(source: str) -> Any:
    """Import a task module from a dotted name or a path to a ``.py`` file.

    A file is imported under a name derived from its path, with its directory on
    ``sys.path`` (so it can import its siblings). A dotted name is looked up as
    ``python -m`` does: the current folder first (put on ``sys.path`` if it is not there;
    the ``lbmqtt`` script's own ``sys.path`` does not hold it), then the installed packages.

    Raises:
        ImportError: the module cannot be found or raises while importing.
    """
    if source.endswith(".py") or "/" in source or source.startswith("."):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise ImportError(f"no such task file: {path}")
        modname = "lbmqtt_tasks_" + "".join(c if c.isalnum() else "_" for c in path.stem)
        existing = sys.modules.get(modname)
        if existing is not None and getattr(existing, "__file__", None) == str(path):
            return existing
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(modname, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[modname]
            raise
        return module
    return _import_here_too(source)


def _import_here_too(name: str) -> Any:
    """Import the dotted module ``name``; if its top-level package is found nowhere on
    ``sys.path``, look in the current folder too, as ``python -m`` would (the installed
    ``lbmqtt`` script does not put it on the path). The folder goes last, and only then: a
    file there never shadows an installed or standard module."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        top = name.partition(".")[0]
        if exc.name != top or any(
            isinstance(p, str) and os.path.abspath(p or ".") == cwd for p in sys.path
        ):
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)


def collect(module: Any) -> Registry:
    """Every task a module declares: its Registry / Node objects and marked functions."""
    reg = Registry()
    for value in list(vars(module).values()):
        inner = getattr(value, "registry", None)
        if isinstance(value, Registry):
            reg.update(value)
        elif isinstance(inner, Registry):
            reg.update(inner)
    for value in list(vars(module).values()):
        name = getattr(value, TASK_ATTR, None)
        if (
            isinstance(name, str)
            and inspect.isfunction(value)
            and value.__module__ == module.__name__
            and name not in reg
        ):
            reg.add_task(name, value)
    return reg


def load_sources(sources: list[str]) -> Registry:
    """Import each task source and merge what they declare.

    Raises:
        ImportError: a source cannot be imported.
        ValueError: two sources register different functions under one name.
    """
    reg = Registry()
    for source in sources:
        reg.update(collect(import_source(source)))
    return reg


def resolve_reference(ref: str) -> Callable[..., Any]:
    """Import the function named by :func:`function_reference`."""
    modpart, _, qualname = ref.rpartition(":")
    if modpart.endswith(".py"):
        path = Path(modpart)
        modname = "__lbmqtt_main__"
        module = sys.modules.get(modname)
        if module is None:
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(modname, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            spec.loader.exec_module(module)
    else:
        module = _import_here_too(modpart)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return obj  # type: ignore[no-any-return]


def wants_context(fn: Callable[..., Any]) -> bool:
    """True if ``fn`` takes a context: a second positional parameter, or one named ``ctx``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())
    if any(p.name == "ctx" for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
