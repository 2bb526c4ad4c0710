"""A backend is one class that sets ``name``: ``backend="<name>"`` then finds it, with nothing to edit
elsewhere; the built-in ones are found the same way."""

from __future__ import annotations

import pytest

import unison
from unison.backends import backend_names, base, resolve_backend


@pytest.fixture
def counting_inline(monkeypatch):
    """An in-process backend defined here, registered by its name for this test only."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class CountingInline(unison.Inline):
        name = "counting-inline"
        created = 0

        def __init__(self) -> None:
            CountingInline.created += 1

        def __repr__(self) -> str:
            return "CountingInline()"

    return CountingInline


def test_the_built_in_backends_are_found_by_their_module_alone():
    names = backend_names()
    assert {"inline", "local", "spark"} <= set(names)
    assert names["local"] is unison.Local and names["spark"] is unison.Spark


def test_a_backend_that_sets_a_name_runs_by_that_name(tmp_path, counting_inline):
    r = unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=3, seed=0),
                   backend="counting-inline", storage=tmp_path, progress=False)
    assert counting_inline.created == 1
    assert len(r.trials) == 3 and set(r.trials["status"]) == {"completed"}


def test_a_subclass_without_a_name_keeps_its_parents_and_replaces_nothing(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class QuietLocal(unison.Local):  # sets no name
        pass

    assert backend_names()["local"] is unison.Local
    assert type(resolve_backend("local")) is unison.Local


def test_an_unknown_backend_name_lists_every_registered_one_with_did_you_mean(counting_inline):
    with pytest.raises(ValueError, match=r"unknown backend 'counting-inlin': did you mean 'counting-inline'"
                                         r".*'inline', 'local', 'ray', 'spark'"):
        resolve_backend("counting-inlin")
