"""What a worker process imports: the local backend's template pre-imports the worker's modules before it
forks workers, on the critical path of a search's first trial, so modules only rare paths need (GPU
detection, distributed ranks, checkpoint shipping, error formatting) load where those paths run."""

from __future__ import annotations

import json
import subprocess
import sys

from unison.worker.fork_server import WORKER_MODULES

NOT_IMPORTED = ("subprocess", "shutil", "tempfile", "difflib", "secrets", "unison.worker.checkpoint_ship",
                "unison.worker.rank", "unison.frameworks.torch", "unison.frameworks.keras")


def test_the_worker_modules_leave_the_rare_paths_unimported() -> None:
    code = (f"import sys\nfor name in {('unison.worker.fork_server', *WORKER_MODULES)!r}: __import__(name)\n"
            "import json; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert set(WORKER_MODULES) <= loaded
    assert sorted(loaded & set(NOT_IMPORTED)) == []
