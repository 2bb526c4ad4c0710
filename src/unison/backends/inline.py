"""The inline backend: trials run one after another in the calling process."""

from __future__ import annotations

from unison.backends.base import Backend


class Inline(Backend):
    """Run every trial in this process, sequentially: no pickling, breakpoints work, output is
    still captured per trial."""

    name = "inline"
    in_process = True

    def slots(self) -> int:
        return 1

    def __repr__(self) -> str:
        return "Inline()"
