"""Building many small objects at once (a 100k-trial journal read back) without the cyclic collector.

Reading a journal creates millions of dicts and lists and no reference cycle; Python's collector,
triggered by the allocations, walks every live object again and again (half of a 100k-trial resume).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the block (reference counting still frees memory); it is
    turned on again afterwards only if it was on before, so nested blocks are fine."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
