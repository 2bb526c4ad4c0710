"""``ctx.shard`` in the rank contexts of a two-process distributed trial, built in this process.

A rank's ``ctx`` is made as the trial runner makes it (``Context`` plus the trial message's
``dist`` part bound through :func:`unison.worker.runtime.session_for`); no process group is needed to shard,
so each rank's rows are checked here without starting any process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import Dataset, Subset

from unison.worker.ctx import Context
from unison.worker.rank import RankSession
from unison.worker.runtime import session_for

ROWS = 7  # odd: the ranks get 4 and 3 rows, or 3 and 3 with even=True
WORLD = 2


def rank_context(tmp_path: Path, rank: int) -> tuple[Context, RankSession]:
    """Rank ``rank``'s ``ctx`` as ``TrialRunner`` builds it from a trial message."""
    trial = {
        "trial_id": 0, "hparams": {}, "trial_dir": str(tmp_path / "trial"), "seed": 1,
        "dist": {"rank": rank, "world_size": WORLD, "local_rank": rank, "local_world_size": WORLD,
                 "master_addr": "127.0.0.1", "master_port": 29500},
    }
    session = session_for(trial)
    assert session is not None
    ctx = Context(trial_id=0, trial_dir=trial["trial_dir"], seed=trial["seed"])
    session.bind(ctx)
    return ctx, session


class Squares(Dataset):
    """A map-style dataset whose item ``i`` is ``(i, i * i)``."""

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < ROWS:
            raise IndexError(index)
        return index, index * index


def row_ids(part: Any) -> list[int]:
    """The row numbers (0..ROWS-1) that a shard of one of the ``DATA`` objects holds."""
    if isinstance(part, list):
        return [int(v) for v in part]
    if isinstance(part, np.ndarray):
        return [int(v) for v in part[:, 0]]
    if isinstance(part, pd.DataFrame):
        assert list(part["id"]) == list(part.index)  # rows, not a renumbered copy
        return [int(v) for v in part["id"]]
    if isinstance(part, dict):
        ids = [int(v) for v in part["id"]]
        assert [int(v) for v in part["y"]] == [i * 10 for i in ids]  # the columns stay aligned
        return ids
    if isinstance(part, tuple):
        ids = [int(v) for v in part[0]]
        assert [int(v) for v in part[1]] == [-i for i in ids]
        return ids
    assert isinstance(part, Subset), type(part)
    items = [part[i] for i in range(len(part))]
    assert all(sq == i * i for i, sq in items)
    return [i for i, _ in items]


DATA = {
    "list": lambda: list(range(ROWS)),
    "numpy": lambda: np.stack([np.arange(ROWS), np.arange(ROWS) * 2], axis=1),
    "dataframe": lambda: pd.DataFrame({"id": range(ROWS), "x": [i * 0.5 for i in range(ROWS)]}),
    "dict of arrays": lambda: {"id": np.arange(ROWS), "y": torch.arange(ROWS) * 10},
    "tuple of tensors": lambda: (torch.arange(ROWS), -torch.arange(ROWS)),
    "torch dataset": Squares,
}


@pytest.mark.parametrize("kind", list(DATA))
def test_two_ranks_cover_the_data_exactly_once_in_contiguous_blocks(tmp_path: Path, kind: str) -> None:
    data = DATA[kind]()
    parts = [rank_context(tmp_path, rank)[0].shard(data) for rank in range(WORLD)]
    ids = [row_ids(part) for part in parts]
    assert ids == [[0, 1, 2, 3], [4, 5, 6]], (kind, ids)
    if kind == "torch dataset":
        assert all(part.dataset is data for part in parts)  # a view of the dataset, not a copy


@pytest.mark.parametrize("kind", list(DATA))
def test_even_shards_have_one_size_and_leave_the_remainder_out(tmp_path: Path, kind: str) -> None:
    data = DATA[kind]()
    ids = [row_ids(rank_context(tmp_path, rank)[0].shard(data, even=True)) for rank in range(WORLD)]
    assert ids == [[0, 1, 2], [3, 4, 5]], (kind, ids)


def test_the_rank_context_has_the_ranks_place_and_uses_its_session(tmp_path: Path) -> None:
    ctx, session = rank_context(tmp_path, 1)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_chief) == (1, 2, 1, False)
    assert ctx._session is session  # ctx.shard and ctx.prepare go through the rank's session


@pytest.mark.parametrize("kind", list(DATA))
def test_a_context_built_by_hand_for_a_rank_shards_like_the_rank_context(tmp_path: Path, kind: str) -> None:
    # ``unison.Context`` is public: a user testing a function builds one for rank r of 2 without a
    # session; it must give the same rows as the rank context of a real distributed trial.
    data = DATA[kind]()
    for rank in range(WORLD):
        by_hand = Context(trial_id=0, trial_dir=tmp_path / "t", rank=rank, world_size=WORLD)
        assert by_hand._session is None
        for even in (False, True):
            expected = row_ids(rank_context(tmp_path, rank)[0].shard(data, even=even))
            assert row_ids(by_hand.shard(data, even=even)) == expected


def test_outside_distributed_training_shard_is_the_identity(tmp_path: Path) -> None:
    ctx = Context(trial_id=0, trial_dir=tmp_path / "t")
    for make in DATA.values():
        data = make()
        assert ctx.shard(data) is data
