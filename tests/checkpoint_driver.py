"""A checkpointing search driver to run as its own process, so a test can SIGKILL it.

Usage: ``python tests/checkpoint_driver.py STORAGE WORKDIR TRIALS SLEEP BACKEND``
"""

from __future__ import annotations

import sys

from helpers_checkpoint import make_search, train

import unison


def main() -> None:
    storage, workdir, trials, sleep, backend = sys.argv[1:6]
    search = make_search(workdir, trials=int(trials), sleep=float(sleep))
    chosen = unison.Local(workers=2) if backend == "local" else "inline"
    result = unison.run(train, search, backend=chosen, storage=storage, progress=False)
    print(f"finished: {result.status}", flush=True)


if __name__ == "__main__":
    main()
