"""PyTorch integration: module ablation (and, with distributed training, ``prepare``)."""

from __future__ import annotations

from typing import Any

import torch


class AblatedModule(torch.nn.Module):
    """Stands in for a removed submodule: passes its (first) input through unchanged.

    On the first call it runs the removed module once (without gradients, on the input's device,
    leaving the random number generators as they were) to check that its output had the input's
    shape; otherwise the next layer would fail with a message that does not say which ablation
    caused it.
    """

    def __init__(self, path: str, removed: torch.nn.Module) -> None:
        super().__init__()
        self.path = path
        self._removed = [removed]  # a list, so its parameters are not registered and not trained
        self._checked = False

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._checked:
            self._check(x, *args, **kwargs)
            self._checked = True
            self._removed.clear()
        return x

    def _check(self, x: Any, *args: Any, **kwargs: Any) -> None:
        """Raise if the removed module's output does not have the shape of its input."""
        removed = self._removed[0]
        device = getattr(x, "device", None)
        if device is not None:
            removed.to(device)
        cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            out = removed(x, *args, **kwargs)
        in_shape, out_shape = _shape(x), _shape(out)
        if in_shape != out_shape:
            raise ValueError(
                f"cannot ablate module {self.path!r} ({type(removed).__name__}): replacing it by an "
                f"identity needs its output to have its input's shape, but it maps {in_shape} to "
                f"{out_shape}. Ablate a module whose input and output shapes agree (an activation, a "
                f"dropout, a residual block), or pass a variant model_fn without it"
            )

    def extra_repr(self) -> str:
        return f"ablated={self.path!r}"


def _shape(value: Any) -> Any:
    """A tensor's shape as a tuple; otherwise the value's type name."""
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else type(value).__name__


def replace_with_identity(model: torch.nn.Module, path: str) -> None:
    """Replace the submodule at dotted ``path`` with an :class:`AblatedModule`."""
    try:
        removed = model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        raise KeyError(f"the model has no module {path!r}; its modules are {names}") from None
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, AblatedModule(path, removed))


def module_names(model: torch.nn.Module) -> list[str]:
    """Every submodule's dotted path."""
    return [name for name, _ in model.named_modules() if name]
