"""The demo: a real search for a small NumPy neural network on scikit-learn's bundled digits data.

``unison demo`` runs it; the functions below are ordinary user code, written once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unison.space import choice, integer, loguniform


def load_digits_split() -> dict[str, np.ndarray]:
    """8x8 digit images (shipped with scikit-learn), scaled to [0, 1], split 80/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the demo needs scikit-learn for its bundled digits data: pip install 'unison[demo]'"
        ) from None
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float64) / 16.0
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return {"x_train": x[:cut], "y_train": y[:cut], "x_val": x[cut:], "y_val": y[cut:]}


def train(
    hparams: dict[str, Any], dataset: dict[str, np.ndarray], reporter: Any, ctx: Any
) -> dict[str, float]:
    """A one-hidden-layer MLP trained with mini-batch SGD and momentum; reports validation accuracy."""
    rng = np.random.default_rng(ctx.seed)
    x, y = dataset["x_train"], dataset["y_train"]
    n_in, n_hidden, n_out = x.shape[1], hparams["hidden"], 10
    w1 = rng.normal(0, np.sqrt(2 / n_in), (n_in, n_hidden))
    b1 = np.zeros(n_hidden)
    w2 = rng.normal(0, np.sqrt(1 / n_hidden), (n_hidden, n_out))
    b2 = np.zeros(n_out)
    params = [w1, b1, w2, b2]
    velocity = [np.zeros_like(p) for p in params]
    lr, l2, batch, momentum = hparams["lr"], hparams["l2"], hparams["batch"], 0.9

    def forward(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hidden = np.maximum(inputs @ w1 + b1, 0.0)
        logits = hidden @ w2 + b2
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return hidden, probs / probs.sum(axis=1, keepdims=True)

    accuracy = 0.0
    for epoch in range(hparams["epochs"]):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            xb, yb = x[idx], y[idx]
            hidden, probs = forward(xb)
            grad_logits = probs
            grad_logits[np.arange(len(yb)), yb] -= 1.0
            grad_logits /= len(yb)
            grad_hidden = (grad_logits @ w2.T) * (hidden > 0)
            grads = [xb.T @ grad_hidden + l2 * w1, grad_hidden.sum(0), hidden.T @ grad_logits + l2 * w2,
                     grad_logits.sum(0)]
            for p, v, g in zip(params, velocity, grads, strict=True):
                v *= momentum
                v -= lr * g
                p += v
        _, probs = forward(dataset["x_val"])
        accuracy = float((probs.argmax(axis=1) == dataset["y_val"]).mean())
        reporter.report(step=epoch, accuracy=accuracy)
    print(f"trial {ctx.trial_id}: validation accuracy {accuracy:.4f} with {hparams}")
    return {"accuracy": accuracy}


SPACE = {
    "lr": loguniform(1e-3, 1.0),
    "hidden": integer(8, 128, log=True),
    "l2": loguniform(1e-6, 1e-1),
    "batch": choice([16, 32, 64, 128]),
    "epochs": 20,
}
