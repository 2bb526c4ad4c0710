"""A search driver to run as its own process, so a test can kill it or press Ctrl-C on it.

Usage: ``python tests/fault_driver.py STORAGE WORKDIR TRIALS SLEEP``
"""

from __future__ import annotations

import sys

from helpers_train import make_search, train

import unison


def main() -> None:
    storage, workdir, trials, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    search = make_search(workdir, trials=trials, sleep=sleep)
    result = unison.run(train, search, backend=unison.Local(workers=2), storage=storage, progress=False)
    print(f"finished: {result.status}", flush=True)


if __name__ == "__main__":
    main()
