"""Where workers run. A backend is one module in this package with one :class:`~unison.backends.base.Backend`
subclass that sets ``name``: that name then works as ``unison.run(..., backend="<name>")``."""

from __future__ import annotations

import importlib
import pkgutil

from unison.backends.base import Backend, registered_backends


def backend_names() -> dict[str, type[Backend]]:
    """Every backend by name: this package's modules (imported once, which is cheap: none imports its
    engine before it is used) and any other subclass of ``Backend`` that sets ``name``."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return registered_backends()


def resolve_backend(backend: str | Backend | None) -> Backend:
    """A backend instance from ``None`` (local), a name, or an instance."""
    if isinstance(backend, Backend):
        return backend
    from unison._validate import lookup

    name = "local" if backend is None else backend
    return lookup("backend", name, backend_names(), "an instance such as unison.Local(workers=4)")()
