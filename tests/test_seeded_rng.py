"""Random search's numpy-free generator draws exactly what ``numpy.random.default_rng`` draws."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import unison
from unison.optimizers.seeded_rng import SeededRng

SEEDS = [0, 1, 7, 2**31 - 1, 2**32, 2**40 + 3, 2**70 + 11]


@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_and_integers_match_numpy_draw_for_draw(seed):
    pick = random.Random(seed)
    for trial in range(300):
        words = [seed, trial]
        ours, numpy_rng = SeededRng(words), np.random.default_rng(words)
        for _ in range(8):  # a mix of calls, as a space of several hyperparameters makes them
            kind = pick.randrange(4)
            if kind == 0:
                low, high = pick.uniform(-5, 5), pick.uniform(5, 1e4)
                assert ours.uniform(low, high) == float(numpy_rng.uniform(low, high))
            elif kind == 1:
                n = pick.choice([1, 2, 3, 10, 241, 2**31, 2**32 + 5, 2**63 - 1])
                assert ours.integers(n) == int(numpy_rng.integers(n))
            elif kind == 2:
                low = pick.randrange(-1000, 1000)
                high = low + pick.choice([1, 2, 7, 100, 2**33])
                assert ours.integers(low, high) == int(numpy_rng.integers(low, high))
            else:
                assert ours.random() == float(numpy_rng.random())


def test_single_word_and_empty_tail_seeds_match_numpy():
    for words in ([0], [5], [2**64 + 1], [3, 0, 9]):
        assert [SeededRng(words).uniform(0, 1) for _ in range(3)] == [
            float(np.random.default_rng(words).uniform(0, 1)) for _ in range(3)
        ]


def test_random_search_draws_what_numpy_would_for_every_distribution():
    space = {"lr": unison.loguniform(1e-4, 1e-1), "p": unison.uniform(0, 0.5),
             "units": unison.integer(16, 256), "batch": unison.integer(8, 512, log=True),
             "act": unison.choice(["relu", "tanh", "gelu"])}
    optimizer = unison.RandomSearch()
    optimizer.setup(space, "max", 11)
    for n in range(50):
        rng = np.random.default_rng([11, n])
        expected = {name: dist.sample(rng) for name, dist in space.items()}
        assert optimizer.suggest(n) == expected


def test_bad_ranges_are_refused_as_numpy_refuses_them():
    with pytest.raises(ValueError, match="high <= low"):
        SeededRng([1]).integers(5, 5)
    with pytest.raises(ValueError, match="non-negative"):
        SeededRng([-1])


def test_a_random_search_never_imports_numpy_in_the_driver(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import unison

        def trial(x):
            return x

        search = unison.Search({{"x": unison.uniform(0, 1)}}, metric="x", trials=6, optimizer="random",
                               seed=0)
        result = unison.run(trial, search, backend=unison.Local(workers=2), progress=False,
                            storage={str(tmp_path)!r})
        assert sum(r["status"] == "completed" for r in result.rows) == 6, result.rows
        print("numpy" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
