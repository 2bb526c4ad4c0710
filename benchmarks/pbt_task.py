"""The task of ``pbt.py`` and ``pbt_ray.py``: an MLP on scikit-learn's digits with noisy training labels.

Written once, without unison or Ray, so that both frameworks run the very same training loop; each
wraps :func:`run_trial` in its own way of reporting and checkpointing.

Why this task: 30% of the training labels are replaced by random digits. With clean labels the loss
can go to zero and the gradient noise vanishes, so a fixed learning rate loses little; with noisy
labels the minibatch gradients stay noisy to the end, so constant-rate SGD keeps wandering in a region
whose size grows with the rate. A large rate learns fast early and a small one ends more precisely:
a decaying schedule beats every fixed rate, which is what population-based training can find and a
fixed-hyperparameter search cannot. Validation and test labels are clean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

STEPS = 32  # a trial's length: one epoch over the training split per step
HIDDEN = 64
BATCH = 16
LABEL_NOISE = 0.3

_DATA: dict[float, dict[str, np.ndarray]] = {}


def load_split(label_noise: float = LABEL_NOISE) -> dict[str, np.ndarray]:
    """Digits scaled to [0, 1], split 60/20/20 (train/validation/test) with a fixed seed, a fraction
    ``label_noise`` of the training labels replaced by uniformly drawn digits. Cached per process."""
    if label_noise not in _DATA:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x / 16.0
        order = np.random.default_rng(0).permutation(len(x))
        x, y = x[order], y[order]
        a, b = int(0.6 * len(x)), int(0.8 * len(x))
        y_train = y[:a].copy()
        rng = np.random.default_rng(1)
        noisy = rng.random(a) < label_noise
        y_train[noisy] = rng.integers(0, 10, int(noisy.sum()))
        _DATA[label_noise] = {"x_train": x[:a], "y_train": y_train, "x_val": x[a:b], "y_val": y[a:b],
                              "x_test": x[b:], "y_test": y[b:]}
    return _DATA[label_noise]


def fresh_state(seed: int) -> dict[str, list[np.ndarray]]:
    """A new model (He-initialised weights, zero biases) and zero momentum buffers."""
    rng = np.random.default_rng(seed)
    params = [rng.normal(0, np.sqrt(2 / 64), (64, HIDDEN)), np.zeros(HIDDEN),
              rng.normal(0, np.sqrt(1 / HIDDEN), (HIDDEN, 10)), np.zeros(10)]
    return {"params": params, "velocity": [np.zeros_like(p) for p in params]}


def _logits(params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w1, b1, w2, b2 = params
    hidden = np.maximum(x @ w1 + b1, 0.0)
    return hidden, hidden @ w2 + b2


def _accuracy(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float((_logits(params, x)[1].argmax(axis=1) == y).mean())


def _sgd_step(state: dict[str, list[np.ndarray]], x: np.ndarray, y: np.ndarray, lr: float,
              momentum: float) -> None:
    """One minibatch of softmax cross-entropy; SGD with momentum as torch.optim.SGD does it
    (``v = momentum * v + g; p -= lr * v``)."""
    params = state["params"]
    hidden, logits = _logits(params, x)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(y)), y] -= 1.0
    grad_logits = probs / len(y)
    grad_hidden = (grad_logits @ params[2].T) * (hidden > 0)
    grads = [x.T @ grad_hidden, grad_hidden.sum(0), hidden.T @ grad_logits, grad_logits.sum(0)]
    for p, v, g in zip(params, state["velocity"], grads, strict=True):
        v *= momentum
        v += g
        p -= lr * v


def run_trial(hparams: dict[str, Any], data: dict[str, np.ndarray], seed: int, start: int,
              state: dict[str, Any] | None, report: Callable[[int, dict[str, Any], dict[str, float]], None],
              steps: int = STEPS) -> dict[str, float]:
    """Train from ``state`` (``{"params": [...], "velocity": [...]}``: the model and its optimizer's
    momentum buffers; ``None``: a fresh model from ``seed``) for steps ``start .. steps - 1`` with SGD
    at ``hparams["lr"]`` and ``hparams["momentum"]``; after each step call ``report(step, state,
    metrics)`` with the new state and ``{"acc": validation accuracy, "test_acc": test accuracy}``.
    ``data`` is :func:`load_split`'s. Returns the last metrics."""
    state = fresh_state(seed) if state is None else state
    x, y = data["x_train"], data["y_train"]
    lr, momentum = float(hparams["lr"]), float(hparams["momentum"])
    for step in range(start, steps):
        order = np.random.default_rng([seed, step]).permutation(len(x))
        for first in range(0, len(x), BATCH):
            batch = order[first : first + BATCH]
            _sgd_step(state, x[batch], y[batch], lr, momentum)
        report(step, state, _metrics(state, data))
    return _metrics(state, data)  # also when there was no step left (a clone of a finished member)


def _metrics(state: dict[str, Any], data: dict[str, np.ndarray]) -> dict[str, float]:
    return {"acc": _accuracy(state["params"], data["x_val"], data["y_val"]),
            "test_acc": _accuracy(state["params"], data["x_test"], data["y_test"])}
