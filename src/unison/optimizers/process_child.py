"""The optimizer's process (``python -m unison.optimizers.process_child MODULE...``): imports the
modules named (and calls ``function`` for ``MODULE:function``), then answers the frames on its stdin
(see :mod:`unison.optimizers.process`) until that closes or the driver says ``close``.

Requests are ``(op, arg)``: ``load`` (the driver's ``sys.path`` and the cloudpickled optimizer),
``suggest`` (a trial number) and ``close`` are answered with ``("ok", value)`` or an error reply;
``observe`` and ``setup`` (their arguments) are not answered: an exception either raises is the answer
to the next request instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import IO, Any

from unison.optimizers.process import error_reply, read_frame, write_frame


def _preload(names: list[str]) -> None:
    """Import each module named; for ``module:function``, call the function too (a warm-up)."""
    for name in names:
        module, _, function = name.partition(":")
        try:
            imported = importlib.import_module(module)
            if function:
                getattr(imported, function)()
        except Exception:  # noqa: BLE001 - the optimizer's own call says what is missing or wrong
            pass


def _load(arg: tuple[list[str], bytes]) -> Any:
    import cloudpickle

    paths, blob = arg
    sys.path.extend(p for p in paths if p not in sys.path)  # where the user's modules are found
    return cloudpickle.loads(blob)


def serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """Answer requests until the input ends or a ``close`` request."""
    optimizer: Any = None
    pending: BaseException | None = None  # what the last failed observe raised, for the next reply
    while True:
        try:
            op, arg = read_frame(requests)
        except EOFError:  # the driver closed the pipe, or died
            return
        if op in ("observe", "setup"):
            try:
                getattr(optimizer, op)(*arg)
            except Exception as exc:  # noqa: BLE001 - sent to the driver
                pending = pending or exc
            continue
        if pending is not None:
            reply, pending = error_reply(pending), None
        else:
            try:
                if op == "load":
                    optimizer, value = _load(arg), None
                elif op == "suggest":
                    value = optimizer.suggest(arg)
                else:
                    value = None
                reply = ("ok", value)
            except Exception as exc:  # noqa: BLE001 - sent to the driver
                reply = error_reply(exc)
        write_frame(replies, reply)
        if op == "close":
            return


def main(argv: list[str]) -> None:
    """Import ``argv``'s modules, then serve the driver on stdin and stdout."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the optimizer prints goes to stderr, not into the replies
    sys.stdout = sys.stderr
    _preload(argv)
    try:
        serve(sys.stdin.buffer, replies)
    except BrokenPipeError:  # the driver is gone
        pass
    sys.stderr.flush()
    os._exit(0)  # at once: tearing down torch's interpreter takes ~0.5 s, while the driver waits


if __name__ == "__main__":
    main(sys.argv[1:])
