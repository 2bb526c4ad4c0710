"""What runs inside a Ray actor of the Ray backend: the worker loop, and how a failed Ray call reads.

:class:`UnisonRayWorker` is imported on the nodes (ray pickles the class by reference), so it stays
apart from :class:`unison.backends.ray.Ray`, which only the driver uses.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the names in its messages


class UnisonRayWorker:
    """The actor of one slot (``ray.remote`` is applied when a backend starts: ray is not imported
    with unison). Its class name is how ``ray.util.state.list_actors`` shows unison's actors."""

    def serve(self, address: tuple[str, int], secret: bytes, payload: bytes, worker: str,
              heartbeat_interval: float, ship_limit: int) -> dict[str, Any]:
        """Serve trials until the driver says shut down or hangs up, then say how it went.

        It runs in the actor's main thread, so a trial the driver hung up on is interrupted there (see
        :class:`unison.worker.serve._TrialInterrupter`), and the call returns normally.
        """
        import ray

        from unison.gpus import GPUS_VAR, visible_ids
        from unison.worker.serve import serve

        # Ray set CUDA_VISIBLE_DEVICES for an actor with num_gpus; UNISON_GPUS tells the worker the same ids
        gpus = visible_ids(",".join(str(gpu) for gpu in ray.get_gpu_ids()))
        if gpus:
            os.environ[GPUS_VAR] = ",".join(gpus)
        else:
            os.environ.pop(GPUS_VAR, None)

        info: dict[str, Any] = {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(),
                                "node": ray.get_runtime_context().get_node_id(), "trials": 0, "error": None}
        try:
            info["trials"] = serve(address, secret, payload, worker, heartbeat_interval,
                                   shared_filesystem=False, ship_limit=ship_limit,
                                   exit_when_driver_gone=False, node=info["node"])
        except (ConnectionError, OSError) as exc:  # the driver is unreachable, or already gone
            info["error"] = f"{type(exc).__name__}: {exc}"
        return info


def short_error(exc: BaseException) -> str:
    """One line about why a Ray call failed (Ray's messages run to many lines)."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    return f"{type(exc).__name__}: {text[:600]}"


def death_cause(error: str) -> str:
    """Why Ray says an actor died, in a sentence ("it was killed by `ray.kill`", "its worker process
    has died"), else the start of ``error``."""
    match = re.search(r"The actor is dead because (.+?\.)(?: |$)", error)
    return f"Ray actor died: {match.group(1)}" if match else error[:300]
