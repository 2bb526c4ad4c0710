"""Shipping a trial's files to the driver when workers do not share its disk (Spark executors).

Such a worker runs each trial in a private temporary folder and sends back, inside the trial's result
message, the files found there: first the logs (``stdout.log``, ``stderr.log``, ``metrics.jsonl``),
then the files the function wrote into ``ctx.trial_dir``, smallest first, while their total stays
within the per-trial limit (:data:`SHIP_LIMIT_BYTES`, 8 MiB by default). A log that does not fit
keeps its last lines; any other file that does not fit stays behind, and the trial's ``stderr.log``
and its ``end`` journal event (``files_skipped``) say which. The driver writes the files into
``trials/<id>/`` of the experiment directory.

On every backend each of a trial's log files (``stdout.log``, ``stderr.log``, ``metrics.jsonl``) is
capped at :data:`LOG_LIMIT_BYTES` (8 MiB) as it is written: past it the log keeps its last part, under
a first line saying how many bytes of earlier output were cut, and the trial's ``end`` journal event
says so too (``logs_cut``: ``{"stdout.log": bytes cut}``).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from unison.worker.logs import LOG_LIMIT_BYTES, LazyLog  # noqa: F401 - LOG_LIMIT_BYTES: part of this module's contract

SHIP_LIMIT_BYTES = 8 * 1024 * 1024
MAX_SHIP_LIMIT_BYTES = 48 * 1024 * 1024  # the protocol caps a message at 64 MiB
LOGS = ("stdout.log", "stderr.log", "metrics.jsonl")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def _tail(data: bytes, budget: int) -> bytes:
    """The last whole lines of ``data`` that fit in ``budget`` bytes."""
    if budget <= 0:
        return b""
    cut = data[-budget:]
    newline = cut.find(b"\n")
    return cut[newline + 1:] if newline >= 0 and len(cut) < len(data) else cut


def collect(trial_dir: Path, limit: int = SHIP_LIMIT_BYTES) -> tuple[dict[str, bytes], list[str]]:
    """The files under ``trial_dir`` to ship (``{relative posix path: bytes}``) and notes on what was
    left out or cut. Symbolic links and special files are not followed."""
    found: list[tuple[str, Path, int]] = []
    for path in trial_dir.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        found.append((path.relative_to(trial_dir).as_posix(), path, path.stat().st_size))
    logs = [f for f in found if f[0] in LOGS]
    others = sorted((f for f in found if f[0] not in LOGS), key=lambda f: (f[2], f[0]))
    files: dict[str, bytes] = {}
    notes: list[str] = []
    budget = limit
    for name, path, size in sorted(logs, key=lambda f: LOGS.index(f[0])) + others:
        if size > budget and name not in LOGS:
            notes.append(f"{name} ({_size(size)}): not shipped")
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            notes.append(f"{name}: could not be read ({exc})")
            continue
        if len(data) > budget:
            if name not in LOGS:  # it grew since it was measured
                notes.append(f"{name} ({_size(len(data))}): not shipped")
                continue
            data = _tail(data, budget)
            notes.append(f"{name} ({_size(size)}): only its last {_size(len(data))} were kept")
        files[name] = data
        budget -= len(data)
    if notes:
        note = (f"\nunison: not all of this trial's files reached the driver (a worker without the "
                f"driver's disk ships at most {_size(limit)} per trial):\n")
        note += "".join(f"  {n}\n" for n in notes)
        files["stderr.log"] = files.get("stderr.log", b"") + note.encode()
    return files, notes


def write(trial_dir: Path, files: dict[str, bytes]) -> None:
    """Write shipped ``files`` under ``trial_dir``; names that would leave the folder are refused."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        relative = PurePosixPath(name)
        if (not isinstance(data, bytes) or relative.is_absolute() or not relative.parts
                or any(part in ("", ".", "..") for part in relative.parts)):
            raise ValueError(f"refusing to write a shipped trial file named {name!r}")
        target = trial_dir.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative.name in LOGS and len(relative.parts) == 1:

            # A retried trial's logs follow the earlier attempt's, within LOG_LIMIT_BYTES in all.
            log = LazyLog(target, json_note=relative.name == "metrics.jsonl")
            try:
                log.write_bytes(data)
            finally:
                log.close()
        else:
            target.write_bytes(data)
