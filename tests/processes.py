"""Process, journal and socket checks shared by the tests that start drivers and workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def journal(path: Path) -> list[dict[str, Any]]:
    """The complete events of the experiment ``path``'s journal (a line being written is left out)."""
    file = path / "journal.jsonl"
    if not file.is_file():
        return []
    events = []
    for line in file.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """``predicate()``'s first true value, polling until ``timeout``; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_script(tmp_path: Path, script: str, *args: object) -> subprocess.Popen[bytes]:
    """The driver script ``tests/<script>`` run with ``args`` as a child process (so a test can SIGKILL
    it), its output in ``tmp_path/driver.out``, importing what this process imports."""
    out = open(tmp_path / "driver.out", "wb")  # noqa: SIM115 - the child owns it once started
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / script), *map(str, args)],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    out.close()
    return proc


def start_driver(tmp_path: Path, trials: int, sleep: float) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``tests/fault_driver.py`` as a child process; returns it, its storage and its work folder."""
    storage, work = tmp_path / "runs", tmp_path / "work"
    storage.mkdir()
    work.mkdir()
    return start_script(tmp_path, "fault_driver.py", storage, work, trials, sleep), storage, work


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the peer sends until it closes; ``socket.timeout`` if it stays open past ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data
