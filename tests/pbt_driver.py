"""A PBT search driver to run as its own process, so a test can SIGKILL it.

Usage: ``python tests/pbt_driver.py STORAGE POPULATION SLEEP``
"""

from __future__ import annotations

import sys

from helpers_pbt import make_search, train

import unison


def main() -> None:
    storage, population, sleep = sys.argv[1:4]
    search = make_search(int(population), float(sleep))
    result = unison.run(train, search, backend=unison.Local(workers=int(population)), storage=storage,
                        progress=False)
    print(f"finished: {result.status}", flush=True)


if __name__ == "__main__":
    main()
