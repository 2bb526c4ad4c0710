"""Time unison as an installed package runs: with its modules' bytecode cached.

``pip install`` compiles a package's ``.pyc`` files, so a user's worker process loads unison's modules
without compiling them. A checkout run with ``PYTHONDONTWRITEBYTECODE`` set (as some CI images and
sandboxes do) compiles every unison module in every new process instead, tens of milliseconds a
process, which would be charged to unison's start-up. :func:`use_cached_bytecode` compiles them once
and lets this process and its children write and use the cache.
"""

from __future__ import annotations

import compileall
import os
import sys
from pathlib import Path


def use_cached_bytecode() -> None:
    """Compile unison's modules (once) and let this process and every process it starts use them."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    import unison

    compileall.compile_dir(str(Path(unison.__file__).parent), quiet=1)
