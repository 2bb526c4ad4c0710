"""Population-based training, PBT (Jaderberg et al., "Population Based Training of Neural Networks",
2017, arXiv:1711.09846), asynchronous as in Ray Tune's ``PopulationBasedTraining``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from unison._validate import check_number
from unison.schedulers.base import CONTINUE, Decision, Exploit, Pause, Scheduler
from unison.space import Choice, Distribution, Integer, LogUniform, Uniform

#: What a perturbed numeric hyperparameter is multiplied by (one of them, at random).
FACTORS = (0.8, 1.2)


@dataclass
class _Member:
    """What PBT knows of one running trial."""

    hparams: dict[str, Any]
    last_perturbation: int  # the step of its last exploit decision (or where it was cloned)
    step: int | None = None
    value: float | None = None


class PBT(Scheduler):
    """Population-based training: every ``perturbation_interval`` steps, a trial in the bottom quantile
    of the running population is stopped and replaced by a clone of a trial in the top quantile: a new
    trial that starts from the top trial's latest checkpoint with perturbed hyperparameters.

    The population is the search's ``trials=N`` first trials. The training function must save a
    checkpoint with its reports (``reporter.report(step=..., checkpoint=state, ...)``) and resume from
    ``ctx.checkpoint`` at ``ctx.checkpoint_step + 1``: a clone is such a resume, with other
    hyperparameters. The trial table shows each trial's lineage: its ``member`` (the population slot it
    fills), its ``parent`` (the trial it was cloned from), ``cloned_step`` and its hyperparameters'
    ``schedule``.

    **Turns.** With fewer slots than members (``Local(workers=2)`` and ``trials=8``, inline), members
    take turns, as in Ray Tune: at its decision step a trial that goes on is paused
    (``unison.Pause``) while others wait, and runs again later from its checkpoint; the least advanced
    waiting trial runs first, so the population keeps step. With a slot per member nobody waits.

    **Decision.** When a trial reports at a step at least ``perturbation_interval`` past its last
    decision (or past the step it resumed from), the unfinished trials with a report (running or
    paused) are ranked by their latest value. With ``n`` of them and ``k = ceil(n * quantile_fraction)``
    (at most ``n // 2``), a trial among the worst ``k`` is stopped (``unison.Exploit``) and a clone of
    one of the best ``k``, chosen at random, takes its place; any other trial goes on (so does every
    trial while fewer than two are ranked). The driver acts on a replacement or a pause only at a report
    that saved a checkpoint (the state the trial resumes from), so checkpoint at least every
    ``perturbation_interval`` steps.

    **Explore.** The clone's hyperparameters are the top trial's, with each one named in
    ``hyperparam_mutations`` changed: with probability ``resample_probability`` resampled from it,
    otherwise perturbed: a number is multiplied by 0.8 or 1.2 (clipped to its range; an integer
    rounded), a list's or ``choice``'s value moves to a neighbouring one.

    Args:
        perturbation_interval: steps between two decisions for one trial (>= 1).
        hyperparam_mutations: name -> a distribution (``unison.loguniform(1e-4, 1e-1)``), a list of
            values, or a function of no arguments that samples one value.
        quantile_fraction: the share of the population in the top and in the bottom quantile (0-0.5].
        resample_probability: the chance that a mutated hyperparameter is resampled rather than perturbed.
        seed: seeds the choices of parents and mutations; ``None``: the search's seed.
    """

    def __init__(self, perturbation_interval: int, hyperparam_mutations: Mapping[str, Any],
                 quantile_fraction: float = 0.25, resample_probability: float = 0.25,
                 seed: int | None = None) -> None:
        self.perturbation_interval = check_number(perturbation_interval, "perturbation_interval", owner="PBT",
                                                  integer=True, low=1)
        self.quantile_fraction = check_number(quantile_fraction, "quantile_fraction", owner="PBT", low=0.0,
                                              high=0.5, low_inclusive=False)
        self.resample_probability = check_number(resample_probability, "resample_probability", owner="PBT",
                                                 low=0.0, high=1.0)
        self.hyperparam_mutations = _check_mutations(hyperparam_mutations)
        self.seed = seed
        self.members: dict[int, _Member] = {}
        self._rng: Any = None
        # Whether trials wait for a slot (set by the driver): then a trial that goes on at its decision
        # step is paused instead, to run again later from its checkpoint, so the population keeps step
        self.waiting: Callable[[], bool] = lambda: False

    def setup(self, mode: str) -> None:
        """Called once before the first report; forgets any earlier run's population."""
        super().setup(mode)
        self.members = {}
        self.reseed(None)

    def reseed(self, search_seed: int | None) -> None:
        """Seed the random choices: with ``seed`` if given, else with the search's seed."""
        import numpy as np

        seed = self.seed if self.seed is not None else search_seed
        self._rng = np.random.default_rng([7, 0 if seed is None else seed])

    def on_start(self, trial_id: int, hparams: dict[str, Any], cloned_step: int | None = None) -> None:
        """Trial ``trial_id`` starts with ``hparams`` (a clone: from its parent's checkpoint of
        ``cloned_step``)."""
        step = cloned_step if cloned_step is not None else 0
        member = self.members.get(trial_id)
        if member is None:
            self.members[trial_id] = _Member(dict(hparams), step)
        else:  # a paused or retried trial's next turn: its last value still ranks it
            member.hparams, member.last_perturbation = dict(hparams), step

    def on_report(self, trial_id: int, step: int, value: float) -> Decision:
        member = self.members.get(trial_id)
        if member is None:  # started before this scheduler heard of it (an older journal)
            member = self.members[trial_id] = _Member({}, 0)
        member.step, member.value = step, value
        if step - member.last_perturbation < self.perturbation_interval:
            return CONTINUE
        member.last_perturbation = step
        bottom, top = self._quantiles()
        if trial_id not in bottom or not member.hparams:
            return Pause(f"paused at step {step} for waiting members") if self.waiting() else CONTINUE
        source = top[int(self._rng.integers(len(top)))]
        old = self.members[source]
        if not self.better(old.value, value):  # type: ignore[arg-type]
            # a tie (accuracy on a small validation set): a copy of an equal trial gains nothing, and
            # replacing its clones again and again would never end
            return Pause(f"paused at step {step} for waiting members") if self.waiting() else CONTINUE
        hparams = self.explore(old.hparams)
        return Exploit(f"replaced by a clone of trial {source} (value {old.value:.6g} at step {old.step}, "
                       f"this trial's {value:.6g}) with {_changes(old.hparams, hparams)}", source, hparams)

    def on_complete(self, trial_id: int, status: str) -> None:
        if status != "retried":  # a retried trial keeps its place and its last value
            self.members.pop(trial_id, None)

    def _quantiles(self) -> tuple[list[int], list[int]]:
        """The ids of the worst and of the best running trials with a value (best last)."""
        ranked = [tid for tid, m in self.members.items() if m.value is not None and math.isfinite(m.value)]
        if len(ranked) < 2:
            return [], []
        sign = 1.0 if self.mode == "max" else -1.0
        ranked.sort(key=lambda tid: (sign * self.members[tid].value, -tid))  # type: ignore[operator]
        k = min(math.ceil(len(ranked) * self.quantile_fraction), len(ranked) // 2)
        return ranked[:k], ranked[-k:]

    def explore(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """A perturbed copy of ``hparams`` (see the class docstring)."""
        new = dict(hparams)
        for name, mutation in self.hyperparam_mutations.items():
            resample = name not in new or self._rng.random() < self.resample_probability
            new[name] = _sample(mutation, self._rng) if resample else _perturb(mutation, new[name], self._rng)
        return new

    def to_dict(self) -> dict[str, Any]:
        """The settings, for experiment.json."""
        return {"perturbation_interval": self.perturbation_interval,
                "quantile_fraction": self.quantile_fraction,
                "resample_probability": self.resample_probability, "seed": self.seed,
                "hyperparam_mutations": {k: _describe(v) for k, v in self.hyperparam_mutations.items()}}

    def __repr__(self) -> str:
        return (f"PBT(perturbation_interval={self.perturbation_interval}, hyperparam_mutations="
                f"{sorted(self.hyperparam_mutations)}, quantile_fraction={self.quantile_fraction})")


def _check_mutations(mutations: Any) -> dict[str, Any]:
    if not isinstance(mutations, Mapping) or not mutations:
        raise ValueError(f"PBT(hyperparam_mutations={mutations!r}) must name at least one hyperparameter: "
                         f"e.g. {{'lr': unison.loguniform(1e-4, 1e-1), 'batch_size': [32, 64, 128]}}")
    checked: dict[str, Any] = {}
    for name, mutation in mutations.items():
        if isinstance(mutation, (list, tuple)):
            if not mutation:
                raise ValueError(f"PBT(hyperparam_mutations={{{name!r}: []}}): give values to choose from")
            mutation = Choice(list(mutation))
        elif not isinstance(mutation, (Uniform, LogUniform, Integer, Choice)) and not callable(mutation):
            raise TypeError(f"PBT(hyperparam_mutations={{{name!r}: {mutation!r}}}): give a distribution "
                            f"(unison.uniform, loguniform, integer, choice), a list of values or a function "
                            f"of no arguments that returns a value")
        checked[str(name)] = mutation
    return checked


def _sample(mutation: Distribution | Callable[[], Any], rng: Any) -> Any:
    return mutation.sample(rng) if isinstance(mutation, Distribution) else mutation()


def _perturb(mutation: Distribution | Callable[[], Any], value: Any, rng: Any) -> Any:
    """``value`` nudged within ``mutation``: times 0.8 or 1.2 for a range, a neighbour in a choice;
    a function's value (no range known) is multiplied when it is a number, else resampled."""
    factor = FACTORS[int(rng.integers(len(FACTORS)))]
    if isinstance(mutation, Choice):
        values = mutation.values
        if value not in values:
            return _sample(mutation, rng)
        index = values.index(value) + (-1 if factor < 1 else 1)
        return values[min(max(index, 0), len(values) - 1)]
    if isinstance(mutation, (Uniform, LogUniform, Integer)):
        moved = min(max(value * factor, mutation.low), mutation.high)
        return int(round(moved)) if isinstance(mutation, Integer) else float(moved)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return type(value)(value * factor) if isinstance(value, float) else int(round(value * factor))
    return _sample(mutation, rng)


def _describe(mutation: Any) -> Any:
    if isinstance(mutation, Distribution):
        return mutation.to_dict()
    return getattr(mutation, "__name__", "function")


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [f"{k}={new[k]:.4g}" if isinstance(new[k], float) else f"{k}={new[k]!r}"
               for k in new if old.get(k) != new[k]]
    return ", ".join(changed) or "the same hyperparameters"
