"""A trial's log files: opened on first write, bounded in size on every backend."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

LOG_LIMIT_BYTES = 8 * 1024 * 1024
"""The most bytes one log file of a trial holds, on every backend."""

_CUT_NOTE = re.compile(rb"^(?:\[unison: |\{\"unison\": \")(\d+) bytes of earlier ")


def _limit_text(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0 else f"{limit} bytes"


class LazyLog(io.TextIOBase):
    """A line-buffered log file opened on first write, so quiet trials cost no file.

    It never holds more than ``limit`` bytes (default :data:`LOG_LIMIT_BYTES`): a
    write that would pass the limit rewrites the file to its last ``limit / 2`` bytes (from a line
    start) under a first line ``[unison: N bytes of earlier output were cut (log limit 8 MiB)]``, so
    the file is rewritten once per ``limit / 2`` bytes written, never once per line. ``json_note``
    writes that line as a JSON object instead (for ``metrics.jsonl``). ``cut``: how many bytes this
    log dropped.
    """

    def __init__(self, path: Path, limit: int | None = None, json_note: bool = False) -> None:
        self.path = path
        self.limit = LOG_LIMIT_BYTES if limit is None else int(limit)
        self.json_note = json_note
        self.cut = 0
        self._file: io.BufferedWriter | None = None
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.write_bytes(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def write_bytes(self, data: bytes) -> None:
        """Append ``data`` (already encoded), within the limit."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            self._size = os.fstat(self._file.fileno()).st_size  # a retried trial's log goes on
        if self._size + len(data) > self.limit:
            self._keep_last(data)
        else:
            self._file.write(data)
            self._size += len(data)
        if b"\n" in data:
            self._file.flush()

    def _keep_last(self, data: bytes) -> None:
        """Rewrite the log as its last part (ending with ``data``) under a note of what was cut."""
        assert self._file is not None
        self._file.flush()
        keep = self.limit // 2
        with open(self.path, "rb") as f:
            head = f.read(200)
            if len(data) < keep:
                f.seek(max(0, self._size - (keep - len(data))))
                tail = f.read() + data
            else:
                tail = data[-keep:]
        newline = tail.find(b"\n")
        if 0 <= newline < len(tail) - 1:
            tail = tail[newline + 1:]
        match = _CUT_NOTE.match(head)
        old_note = head.find(b"\n") + 1 if match else 0
        earlier = int(match.group(1)) if match else 0
        dropped = self._size - old_note + len(data) - len(tail)
        self.cut += dropped
        what = "reports" if self.json_note else "output"
        note = f"{earlier + dropped} bytes of earlier {what} were cut (log limit {_limit_text(self.limit)})"
        line = json.dumps({"unison": note}) if self.json_note else f"[unison: {note}]"
        self._file.close()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(line.encode() + b"\n" + tail)
        self._size = len(line) + 1 + len(tail)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def isatty(self) -> bool:
        return False


