"""A training function whose accuracy is its hyperparameter ``q``, and a grid search over given values
with ASHA: which trials complete, stop and fail is known in advance (a negative ``q`` fails)."""

from __future__ import annotations

import unison


def quality_train(q, reporter):
    print(f"training q={q}")
    if q < 0:
        raise ValueError("a failing trial")
    for step in range(9):
        reporter.report(step=step, acc=q)
    return {"acc": q}


def quality_search(qualities: list[float]) -> unison.Search:
    return unison.Search({"q": unison.choice(qualities)}, metric="acc", mode="max", optimizer="grid",
                         scheduler=unison.ASHA())
