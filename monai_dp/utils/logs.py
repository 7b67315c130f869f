"""Keep the user's logging set-up working: undo the root handler Opacus installs when it is imported.

``opacus.utils.module_utils`` calls ``logging.basicConfig(...)`` when it is imported. That gives the *root*
logger a handler, and from then on a user's own ``logging.basicConfig(level=logging.INFO)`` does nothing (it
only configures a root logger without handlers): the root level stays at WARNING and monai_dp's INFO messages
(the start-up banner, what ``make_private_compatible`` changed, why training stopped) never reach the user.

A library should not configure the root logger (the Python logging HOWTO: libraries add no handler but
``NullHandler``), so monai_dp removes that one handler, and only it:

- Opacus not imported yet (the usual case): :func:`guard_opacus_logging` installs an import hook that runs
  ``opacus.utils.module_utils`` and then removes from the root logger the handlers added *while that module
  executed*; handlers that were there before (the user's) are untouched. The hook removes itself after use.
- Opacus already imported: the handler is recognised by the exact format Opacus gives it
  (:data:`OPACUS_FORMAT`, :data:`OPACUS_DATEFMT`) and removed.

Nothing is lost without it: with no root handler Python still prints WARNING and above to stderr
(``logging.lastResort``) until the user configures logging.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any

__all__ = ["OPACUS_DATEFMT", "OPACUS_FORMAT", "OPACUS_MODULE", "guard_opacus_logging", "remove_opacus_root_handler"]

OPACUS_MODULE = "opacus.utils.module_utils"
OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
OPACUS_DATEFMT = "%m/%d/%Y %H:%M:%S"


def _is_opacus_handler(handler: logging.Handler) -> bool:
    fmt = handler.formatter
    return (type(handler) is logging.StreamHandler and fmt is not None and fmt._fmt == OPACUS_FORMAT
            and fmt.datefmt == OPACUS_DATEFMT)


def remove_opacus_root_handler() -> int:
    """Remove the root handler Opacus' import installed (recognised by its format); the number removed."""
    root = logging.getLogger()
    found = [h for h in root.handlers if _is_opacus_handler(h)]
    for handler in found:
        root.removeHandler(handler)
    return len(found)


class _RootHandlersUndone(importlib.abc.Loader):
    """Runs a module with its own loader, then removes the root handlers the module added."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        root = logging.getLogger()
        before = list(root.handlers)
        try:
            self.inner.exec_module(module)
        finally:
            for handler in [h for h in root.handlers if h not in before]:
                root.removeHandler(handler)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self.inner, name)


class _OpacusImportHook(importlib.abc.MetaPathFinder):
    """Finds ``opacus.utils.module_utils`` with the other finders and wraps its loader (once)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != OPACUS_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RootHandlersUndone(spec.loader)
                return spec
        return None


def guard_opacus_logging() -> None:
    """Make sure Opacus leaves no handler on the root logger (see the module docstring); idempotent."""
    if OPACUS_MODULE in sys.modules:
        remove_opacus_root_handler()
    elif not any(isinstance(f, _OpacusImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _OpacusImportHook())
