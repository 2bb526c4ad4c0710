"""PyTorch integration: module ablation (and, with distributed training, ``prepare``)."""

from __future__ import annotations

from typing import Any

import torch


class AblatedModule(torch.nn.Module):
    """Stands in for a removed submodule: passes its input through unchanged.

    On the first call it runs the removed module once (without gradients) to check that its
    output had the input's shape; otherwise the next layer would fail with a message that does
    not say which ablation caused it.
    """

    def __init__(self, path: str, removed: torch.nn.Module) -> None:
        super().__init__()
        self.path = path
        self._removed = [removed]  # a list, so its parameters are not registered and not trained
        self._checked = False

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._checked:
            self._checked = True
            with torch.no_grad():
                out = self._removed[0](x, *args, **kwargs)
            in_shape, out_shape = getattr(x, "shape", None), getattr(out, "shape", None)
            if in_shape != out_shape:
                raise ValueError(
                    f"cannot ablate module {self.path!r} ({type(self._removed[0]).__name__}): replacing it "
                    f"by an identity needs its output to have its input's shape, but it maps "
                    f"{tuple(in_shape) if in_shape is not None else type(x).__name__} to "
                    f"{tuple(out_shape) if out_shape is not None else type(out).__name__}"
                )
            self._removed.clear()
        return x

    def extra_repr(self) -> str:
        return f"ablated={self.path!r}"


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
